"""Shape of TinyLlama-1.1B (Zhang et al. 2024): 22 layers, d 2048, 32 heads / 4 kv heads, ffn 5632."""

from cpt_jax.run_config import default_config


def get_config():
    c = default_config()
    c.model.update(dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=2048))
    c.seq_len = 2048
    c.model.remat = "dots_no_batch"
    c.model.dtype = "bfloat16"  # accelerator compute; parameters and AdamW state float32
    return c

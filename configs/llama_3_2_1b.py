"""Shape of Llama-3.2-1B: 16 layers, d 2048, 32 heads / 8 kv heads, ffn 8192, tied embeddings,
rope_theta 500000 with Llama-3 RoPE scaling (factor 32)."""

from cpt_jax.run_config import default_config


def get_config():
    c = default_config()
    c.model.update(dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192, head_dim=64, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=131072))
    c.model.rope_scaling = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)
    c.seq_len = 2048
    c.model.remat = "dots"
    c.model.dtype = "bfloat16"  # accelerator compute; parameters and AdamW state float32
    # 4096 x 2048-token batches on one 80 GB GPU: 16 rows per microbatch (46 GiB at remat
    # "dots"); on N devices, microbatches = 256 / N.
    c.global_batch = 4096
    c.microbatches = 256
    return c

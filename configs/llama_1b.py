"""Abbes et al. 2025 "1B": 24 layers, d 1792, 28 heads, ffn 5120 (true Llama)."""

from cpt_jax.run_config import default_config


def get_config():
    c = default_config()
    c.model.update(dict(vocab_size=32000, d_model=1792, n_layers=24, n_heads=28, n_kv_heads=28, d_ff=5120, max_seq_len=2048))
    c.seq_len = 2048
    c.model.remat = "dots_no_batch"
    return c

"""Abbes et al. 2025 "560M": 24 layers, d 1024, 16 heads, ffn 2560 (true Llama)."""

from cpt_jax.run_config import default_config


def get_config():
    c = default_config()
    c.model.update(dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=2560, max_seq_len=2048))
    c.seq_len = 2048
    c.model.remat = "dots_no_batch"
    return c

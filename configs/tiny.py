"""Tiny Llama for tests and smoke runs: 2 layers, d 64, GQA 8 query / 4 kv heads."""

from cpt_jax.run_config import default_config


def get_config():
    c = default_config()
    c.model.update(dict(vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=96, max_seq_len=64))
    c.seq_len = 32
    c.global_batch = 16
    c.optim.lr = 1e-3
    return c

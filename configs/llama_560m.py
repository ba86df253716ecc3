"""Abbes et al. 2025 "560M": 24 layers, d 1024, 16 heads, ffn 2560 (true Llama)."""

from cpt_jax.presets import MODEL_PRESETS
from cpt_jax.run_config import default_config


def get_config():
    c = default_config()
    c.model.update(dict(vocab_size=32000, max_seq_len=2048, **MODEL_PRESETS["560m"]))
    c.seq_len = 2048
    c.model.dtype = "bfloat16"  # accelerator compute; parameters and AdamW state float32
    return c

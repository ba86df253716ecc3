"""Abbes et al. 2025 "99M": 16 layers, d 512, 8 heads, ffn 1280 (true Llama: SwiGLU, RoPE, RMSNorm).

With the Llama-2 tokenizer (32000) this has 48.2M non-embedding and 81.0M total parameters
(untied); the vocabulary follows the tokenizer a run uses."""

from cpt_jax.presets import MODEL_PRESETS
from cpt_jax.run_config import default_config


def get_config():
    c = default_config()
    c.model.update(dict(vocab_size=32000, max_seq_len=2048, **MODEL_PRESETS["99m"]))
    c.seq_len = 2048
    return c

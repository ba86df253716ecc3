"""Abbes et al. 2025 "1B": 24 layers, d 1792, 28 heads, ffn 5120 (true Llama)."""

from cpt_jax.presets import MODEL_PRESETS
from cpt_jax.run_config import default_config


def get_config():
    c = default_config()
    c.model.update(dict(vocab_size=32000, max_seq_len=2048, **MODEL_PRESETS["1b"]))
    c.seq_len = 2048
    c.model.dtype = "bfloat16"  # accelerator compute; parameters and AdamW state float32
    # The paper's 4096 x 2048-token batch on one 80 GB GPU: 16 rows per microbatch (the
    # most that fits with remat "dots"); on N devices, microbatches = 256 / N.
    c.global_batch = 4096
    c.microbatches = 256
    return c

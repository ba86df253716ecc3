"""Continue a Hugging Face Llama checkpoint (Llama-3.x, Llama-2, TinyLlama, SmolLM2, ...) on
a new corpus.

    python scripts/train.py --config configs/cpt_from_hf.py --workdir runs/cpt \
        --config.init.hf=/models/Llama-3.2-1B \
        --config.data.domains='[{"name": "de_web", "kind": "jsonl", "pattern": "/data/de/*.jsonl.gz"}]' \
        --config.tasks='[{"domain": "de_web", "tokens": 1000000000}]'

No model keys and no tokenizer path: the model (shape, RoPE, norms, embedding rows) comes
from the checkpoint's config.json and the tokenizer is the checkpoint's own
(``cpt_jax.pretrained``). A model key that contradicts the checkpoint is refused.

The optimizer follows Ibrahim et al. 2024 for continuing a pretrained model: re-warm to a
small peak learning rate and decay per task (``rewarm_cosine``), AdamW (0.9, 0.95), weight
decay 0.1, clip 1.0. bfloat16 compute with float32 master weights; remat of the matmuls
keeps 1B-scale models on one 80 GB accelerator at 8 x 2048 per microbatch.
"""

from cpt_jax.run_config import default_config


def get_config():
    c = default_config()
    c.init.hf = ""  # the checkpoint directory: --config.init.hf=/models/Llama-3.2-1B
    c.data.domains = [
        {"name": "new", "kind": "jsonl", "pattern": "/data/new/*.jsonl.gz", "field": "text"},
    ]
    c.tasks = [{"domain": "new", "tokens": 1_000_000_000}]
    c.seq_len = 2048
    c.global_batch = 256
    c.microbatches = 32
    c.model.dtype = "bfloat16"
    c.model.remat = "dots"
    c.optim.update(dict(lr=3e-5, min_lr_ratio=0.1, warmup_frac=0.01, schedule="rewarm_cosine"))
    c.eval.update(dict(every=500, max_rows=256, batch=32))
    c.checkpoint.update(dict(every=1000, keep=2))
    c.save_final_params = True
    return c

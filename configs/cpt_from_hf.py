"""Continue a Hugging Face Llama checkpoint (Llama-3.x, Llama-2, TinyLlama, SmolLM2, ...) on
a new corpus.

    python scripts/train.py --config configs/cpt_from_hf.py --workdir runs/cpt \
        --config.init.hf=/models/Llama-3.2-1B

The recipe (Ibrahim et al. 2024; Abbes et al. 2025): train on a weighted mixture of the new
language's corpora while replaying a little of a proxy of the original pre-training data
(``replay.sources``: never trained, replayed from the first step, its forgetting measured
against the start model), with a held-out domain that is only evaluated. Point the domains
at your files (``--config.data.domains='[...]'`` or edit this file); the kinds are listed in
the README's "Bring your own corpus".

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
        # a proxy of the original data (e.g. a FineWeb sample for Llama-3): replayed only;
        # capped to what 10% replay of the run can reach (2.5B new tokens -> 0.25B replayed)
        {"name": "en_orig", "kind": "parquet", "pattern": "/data/fineweb/*.parquet",
         "max_tokens": 300_000_000},
        {"name": "de_web", "kind": "jsonl", "pattern": "/data/de_web/*.jsonl.zst"},
        {"name": "de_wiki", "kind": "hf_dataset", "path": "/data/de_wiki", "split": "train"},
        # evaluated only: what the run does to a language it neither trains nor replays
        {"name": "fr_heldout", "kind": "jsonl", "pattern": "/data/fr/*.jsonl.gz",
         "max_docs": 20_000},
    ]
    c.tasks = [{"domains": {"de_web": 0.8, "de_wiki": 0.2}, "tokens": 2_500_000_000}]
    # 10% of every batch replayed from the original-data proxy (5-25% in Ibrahim et al. 2024)
    c.replay.update(dict(rate=0.1, sources=["en_orig"]))
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

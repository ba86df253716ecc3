"""The offline CPU demo: continual pre-training across three domains that ship with CPython.

Tasks, in order: English prose (Python documentation topics and module docstrings) ->
Python source code -> the Unicode character table (code points, names, categories: a
clearly different, tabular distribution). A small Llama is pre-trained on the prose and
then continually trained on code and the table with 25% replay of earlier tasks
(Abbes et al. 2025), additive accounting. Runs in minutes on 2 CPU cores, no download.

    python scripts/train.py --config configs/demo.py --workdir runs/demo
    python scripts/train.py --config configs/demo.py --workdir runs/demo_seq --config.replay.rate=0
"""

from cpt_jax.run_config import default_config


def get_config():
    c = default_config()
    c.name = "demo"
    c.model.update(dict(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                        d_ff=384, max_seq_len=256, tie_embeddings=True))
    c.seq_len = 128
    c.global_batch = 16
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 24
    c.data.domains = [
        {"name": "prose", "kind": "demo", "demo": "python_docs", "max_chars": 1_000_000},
        {"name": "code", "kind": "demo", "demo": "python_code", "max_chars": 1_000_000},
        {"name": "unicode", "kind": "demo", "demo": "unicode_table", "max_chars": 1_000_000},
    ]
    c.data.cache_dir = "~/.cache/cpt_jax/demo"
    c.tokenizer.sample_chars = 1_500_000
    c.tasks = [{"domain": "prose", "steps": 240},
               {"domain": "code", "steps": 120},
               {"domain": "unicode", "steps": 120}]
    c.replay.rate = 0.25
    c.eval.update(dict(every=40, max_rows=32, batch=32))
    return c

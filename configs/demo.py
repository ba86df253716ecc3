"""The offline CPU demo: continual pre-training across three domains that ship with CPython.

Tasks, in order: English prose (Python documentation topics and module docstrings) ->
Python source code -> the Unicode character table (code points, names, categories: a
clearly different, tabular distribution). A small Llama is pre-trained on the prose and
then continually trained on code and the table with 25% replay of earlier tasks
(Abbes et al. 2025), additive accounting. Runs in minutes on 2 CPU cores, no download.

    python scripts/train.py --config configs/demo.py --workdir runs/demo
    python scripts/train.py --config configs/demo.py:mer25 --workdir runs/mer25

The part after ':' picks a method from METHODS below (default: replay25) or a replay
policy from POLICIES (25% replay from a bounded buffer, ``cpt_jax.replay.policies``).
Methods with one Reptile period (``reptile``, ``mer25``) take its settings after commas,
e.g. ``configs/demo.py:mer25,meta_lr=0.9,every=20`` (``meta_lr`` is the fraction of each
period's displacement kept; see ``cpt_jax.methods.reptile.reptile_interpolate``); a policy
takes its buffer size, e.g. ``configs/demo.py:craig,buffer=512``. Periods
are scaled to the demo: the paper's Reptile period of 500 steps is ~4% of a 100B-token task
(~12k steps at 4096 x 2048 tokens per batch); 4% of a 120-step demo task is 5 steps.
"""

from cpt_jax.presets import MODEL_PRESETS
from cpt_jax.run_config import default_config


def _reptile(c, *periods):
    c.method.name = "replay+reptile"
    c.method.reptile.periods = [{"every": k, "meta_lr": eps} for k, eps in periods]


MER_PERIOD = (5, 0.8)  # (every, meta_lr): see the README's MER meta-rate sweep

# method -> edits of the base config (which has 25% replay).
METHODS = {
    "seq": lambda c: c.replay.update(dict(rate=0.0)),  # sequential fine-tuning
    "replay25": lambda c: None,
    "replay50": lambda c: c.replay.update(dict(rate=0.5)),
    # Reptile alone (no replay), and MER = 25% replay + Reptile (Abbes et al. 2025): keep
    # 0.8 of every 5-step displacement, the best of the README's meta-rate sweep (keeping
    # 0.1, the paper's eps read as Nichol's step size, discards most of what is learned).
    "reptile": lambda c: (c.replay.update(dict(rate=0.0)), _reptile(c, MER_PERIOD)),
    "mer25": lambda c: _reptile(c, MER_PERIOD),
    # Original MER (Riemer et al. 2019): within-batch Reptile (beta) nested in an
    # across-batch one (gamma), here over steps: beta = 0.3 every 2, gamma = 0.1 every 10.
    "mer_original": lambda c: _reptile(c, (2, 0.3), (10, 0.1)),
    # A-GEM: replayed rows give the reference gradient only (Chaudhry et al. 2019).
    "agem": lambda c: c.method.update(dict(name="agem")),
    # Online EWC: at each task end the Fisher of the finished task is added; no replay.
    "ewc": lambda c: (c.replay.update(dict(rate=0.0)), c.method.update(dict(name="replay+ewc")),
                      c.method.ewc.update(dict(lam=1e3))),
    # L2 toward the previous task's final weights; no replay.
    "l2": lambda c: (c.replay.update(dict(rate=0.0)), c.method.update(dict(name="replay+l2")),
                     c.method.l2.update(dict(weight=1e-2, anchor="task_start"))),
    # Logit distillation on replayed rows from a teacher frozen at each task boundary.
    "distill": lambda c: (c.method.update(dict(name="replay+distill")),
                          c.method.distill.update(dict(weight=1.0, temperature=2.0))),
    # Dark Experience Replay (DER++: replay + logit matching on 256 stored rows per task).
    "der": lambda c: (c.method.update(dict(name="replay+der")),
                      c.method.der.update(dict(weight=0.5, k=16, rows_per_domain=256))),
    # Mix-review (He et al. 2021): replay decaying 0.25 -> 0.05 over the run (the code and
    # table tasks), plus a weak L2 pull toward the pre-trained (task-0-start) weights.
    "mixreview": lambda c: (c.replay.update(dict(schedule="exp_decay", end_rate=0.05)),
                            c.method.update(dict(name="replay+l2")),
                            c.method.l2.update(dict(weight=1e-4, anchor="init"))),
    # Joint training on the union of all three domains: the upper reference.
    "joint": lambda c: c.update(dict(joint=True)),
}


DEMO_BUFFER = 128  # rows: 64 per earlier domain during the last task


def _policy(name, **keys):
    def edit(c):
        c.replay.update(dict(policy=name, buffer_rows=DEMO_BUFFER))
        for key, value in keys.items():
            c.replay[key].update(value)
    return edit


# replay policy -> edits of the base config: which rows the 25% replay draws from.
POLICIES = {
    "reservoir": _policy("reservoir"),
    "domains": _policy("domains"),  # E1, tau = 1: by domain size
    "domains_tau0": _policy("domains", domains=dict(tau=0.0)),  # E1, uniform over domains
    "resample": _policy("resample"),  # E2: a fresh buffer every 20 steps
    "curriculum": _policy("curriculum"),  # E3, easy first
    "curriculum_hard": _policy("curriculum", curriculum=dict(order="hard_first")),
    "craig": _policy("craig"),
    "grad_match": _policy("grad_match"),
    "hybrid": _policy("hybrid"),  # E4: half craig, half reservoir
}


def _settings(c, spec: str, arg: str) -> None:
    """Apply ``meta_lr=X,every=K`` to a one-period Reptile method, or ``buffer=K`` to a
    replay policy."""
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key == "buffer" and value.isdigit() and c.replay.policy != "uniform":
            c.replay.buffer_rows = int(value)
        elif key in ("meta_lr", "every") and value and len(c.method.reptile.periods) == 1:
            period = dict(c.method.reptile.periods[0])
            period[key] = int(value) if key == "every" else float(value)
            c.method.reptile.periods = [period]
        else:
            raise ValueError(f"configs/demo.py:{arg}: {item!r} is not a setting of this "
                             "method: meta_lr=X or every=K for reptile and mer25, buffer=K "
                             "for a replay policy; e.g. configs/demo.py:mer25,meta_lr=0.9 or "
                             "configs/demo.py:craig,buffer=512")


def get_config(arg: str = "replay25"):
    method, _, settings = arg.partition(",")
    if method not in METHODS and method not in POLICIES:
        raise ValueError(f"unknown demo method {method!r}; choose one of "
                         f"{sorted(METHODS)} or a replay policy of {sorted(POLICIES)}")
    c = default_config()
    c.model.update(dict(vocab_size=2048, max_seq_len=256, tie_embeddings=True,
                        **MODEL_PRESETS["small"]))
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
    c.name = method  # the run's label; method.name is the composition it selects
    {**METHODS, **POLICIES}[method](c)
    if settings:
        _settings(c, settings, arg)
    return c

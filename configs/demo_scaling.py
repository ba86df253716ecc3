"""The demo at half its steps, for the demo-scale scaling study (README, "Scaling").

Same domains, tokenizer, batch (16 x 128) and optimizer as ``configs/demo.py``; the tasks
are 120 / 60 / 60 nominal steps (prose, code, unicode) and every domain is evaluated every
30 steps, so that 3 model sizes x 3 replay rates x 2 seeds fit in under an hour on 2 CPU
cores:

    python scripts/sweep.py --config configs/demo_scaling.py --workdir sweeps/demo_scaling \
        --grid model=tiny,small,base --grid replay.rate=0,0.25,0.5 --grid seed=0,1

The part after ':' is passed to ``configs/demo.py`` (a method or a replay policy).
"""

import os

from cpt_jax.cli import load_config_file

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


def get_config(arg: str = "replay25"):
    c = load_config_file(f"{DEMO}:{arg}")
    c.tasks = [{"domain": "prose", "steps": 120},
               {"domain": "code", "steps": 60},
               {"domain": "unicode", "steps": 60}]
    c.optim.warmup_steps = 12
    c.eval.every = 30
    if c.name in ("seq", "replay25", "replay50"):
        c.name = ""  # plain replay: reports label it by its rate, which a sweep varies
    return c

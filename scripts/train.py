"""Continual pre-training through a task sequence.

    python scripts/train.py --config configs/demo.py --workdir runs/demo \
        [--config.replay.rate=0.5 --config.global_batch=32 \
         --config.tasks='[{"domain": "prose", "steps": 100}]' ...]

Writes WORKDIR/results.json (loss matrix, eval curve, metrics, config), metrics.jsonl
(training scalars), loss_curves.png and checkpoints/. Any config key can be overridden
(lists and dicts as JSON); an unknown key is an error that names the nearest one.

Run the same command again after a crash, a kill or a preemption and the run resumes from
its latest checkpoint, with the same result as an uninterrupted run. On SIGTERM the run
saves at the next step boundary and exits with status 0. A workdir whose checkpoint was
made with a different config or other data is refused unless --allow_config_change.

A bad input (config value, data, checkpoint, tokenizer) is reported on one line and exits
with status 2; a run that diverged exits with status 1; --debug shows the traceback.
"""

from __future__ import annotations

import sys


from absl import logging

from cpt_jax import cli
from cpt_jax.train.loop import run
from cpt_jax.train.resume import Preempted


def parse_args(argv):
    overrides, rest = cli.split_overrides(argv)
    ap = cli.config_parser("train.py", __doc__)
    ap.add_argument("--workdir", required=True,
                    help="output directory (an existing one is resumed)")
    ap.add_argument("--allow_config_change", action="store_true",
                    help="resume a workdir whose checkpoint was written with a different "
                         "config or data")
    args = ap.parse_args(rest)
    return args, overrides


def main(argv) -> int:
    args, overrides = parse_args(argv)
    config = cli.load_config(args.config, overrides)
    logging.set_verbosity(logging.ERROR)  # orbax logs every save (and read-only opens)
    try:
        results = run(config, args.workdir, allow_config_change=args.allow_config_change)
    except Preempted as e:
        print(e, file=sys.stderr)
        return 0
    print("loss matrix (row: after task, column: domain " + ", ".join(
        results.get("columns") or results["tasks"]) + "):")
    for task, row in zip(results["tasks"], results["loss_matrix"]):
        print(f"  {task:>14}: " + "  ".join(f"{x:.3f}" for x in row))
    print("metrics:", {k: round(v, 4) if isinstance(v, float) else v
                       for k, v in results["metrics"].items()})
    print(f"wrote {args.workdir}/results.json and loss_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))

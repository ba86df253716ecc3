"""Continual pre-training through a task sequence.

    python scripts/train.py --config configs/demo.py --workdir runs/demo \
        [--config.replay.rate=0.5 --config.global_batch=32 ...]

Writes WORKDIR/results.json (loss matrix, eval curve, metrics, config), metrics.jsonl
(training scalars), loss_curves.png and checkpoints/. An unknown --config key is an error.

Run the same command again after a crash, a kill or a preemption and the run resumes from
its latest checkpoint, with the same result as an uninterrupted run. On SIGTERM the run
saves at the next step boundary and exits with status 0. A workdir whose checkpoint was
made with a different config is refused unless --allow_config_change is given.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cpt_jax.train.loop import run
from cpt_jax.train.resume import Preempted

config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (an existing one is resumed).")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume a workdir whose checkpoint was written with a different config.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    try:
        results = run(FLAGS.config, FLAGS.workdir,
                      allow_config_change=FLAGS.allow_config_change)
    except Preempted as e:
        print(e, file=sys.stderr)
        return 0
    print("loss matrix (row: after task, column: domain " + ", ".join(results["tasks"]) + "):")
    for task, row in zip(results["tasks"], results["loss_matrix"]):
        print(f"  {task:>14}: " + "  ".join(f"{x:.3f}" for x in row))
    print("metrics:", {k: round(v, 4) if isinstance(v, float) else v
                       for k, v in results["metrics"].items()})
    print(f"wrote {FLAGS.workdir}/results.json and loss_curves.png")


if __name__ == "__main__":
    app.run(main)

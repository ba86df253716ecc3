"""One process of the multi-host preparation test (tests/test_multiprocess.py); not a test.

    python tests/prepare_worker.py CONFIG WORKDIR SHARD_CHARS OUT_JSON
        [--coordinator HOST:PORT --num_processes P --process_id I]

Joins the multi-process run (``config.distributed``) and prepares the config's data as a
run does (``cpt_jax.train.setup.prepare_data``): every process its share of the units,
process 0 assembles them. Writes OUT_JSON: the prepared folders and how many units this
process tokenized.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from cpt_jax import cli, sharding  # noqa: E402
from cpt_jax.data import prepare, prepare_units  # noqa: E402
from cpt_jax.train import setup  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    for name in ("config", "workdir", "shard_chars", "out"):
        p.add_argument(name)
    p.add_argument("--coordinator", default="")
    p.add_argument("--num_processes", type=int, default=0)
    p.add_argument("--process_id", type=int, default=-1)
    a = p.parse_args()
    c = cli.load_config(a.config, [])
    if a.coordinator:
        c.distributed.update(dict(enabled=True, coordinator_address=a.coordinator,
                                  num_processes=a.num_processes, process_id=a.process_id))
    sharding.maybe_initialize_distributed(c)
    prepare.SHARD_CHARS = int(a.shard_chars)
    written = []
    real = prepare_units.Unit.__init__

    def counting(self, job, staging, u, *args):
        written.append(u)
        real(self, job, staging, u, *args)

    prepare_units.Unit.__init__ = counting
    prepared = setup.prepare_data(c, a.workdir)
    with open(a.out, "w") as f:
        json.dump({"dirs": {n: os.path.dirname(s["train"].path) for n, s in prepared.items()},
                   "units": written}, f)


if __name__ == "__main__":
    sys.exit(main())

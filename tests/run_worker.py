"""Test helper: one process of a training run of a test config, through loop.run.

    python tests/run_worker.py DATA_ROOT WORKDIR [--config resume|loop]
        [--signal SIGKILL|SIGTERM --at N] [--mesh data=1,fsdp=2,tensor=2]
        [--coordinator HOST:PORT --num_processes P --process_id I]

--signal sends this process the signal just before its N-th train step runs: SIGKILL kills
the run there (no chance to clean up); SIGTERM asks it to save and stop (preemption).
With --coordinator the process joins a multi-process run through config.distributed.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cpt_jax.train import loop  # noqa: E402
from cpt_jax.train.resume import Preempted  # noqa: E402
import test_resume  # noqa: E402
import test_train_loop  # noqa: E402


def signal_at(sig, at: int) -> None:
    """Make loop.run's train step send `sig` to this process before its `at`-th call."""
    make_train_step = loop.make_train_step

    def make_signalling_step(*args, **kwargs):
        step = make_train_step(*args, **kwargs)
        calls = [0]

        def signalling_step(state, batch, n_replay, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), sig)
            return step(state, batch, n_replay, **kwargs)

        return signalling_step

    loop.make_train_step = make_signalling_step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("workdir")
    p.add_argument("--config", choices=["resume", "loop"], default="resume")
    p.add_argument("--signal")
    p.add_argument("--at", type=int)
    p.add_argument("--mesh", default="")
    p.add_argument("--coordinator", default="")
    p.add_argument("--num_processes", type=int, default=0)
    p.add_argument("--process_id", type=int, default=-1)
    a = p.parse_args()
    root = Path(a.root)
    if a.config == "resume":
        c = test_resume.resume_config(root)
    else:
        c = test_train_loop._config(root)
        c.checkpoint.every, c.save_final_params = 3, True
    for kv in filter(None, a.mesh.split(",")):
        k, v = kv.split("=")
        c.mesh[k] = int(v)
    if a.coordinator:
        c.distributed.update(dict(enabled=True, coordinator_address=a.coordinator,
                                  num_processes=a.num_processes, process_id=a.process_id))
    if a.signal:
        signal_at(getattr(signal, a.signal), a.at)
    try:
        loop.run(c, a.workdir)
    except Preempted as e:
        print(e, file=sys.stderr)


if __name__ == "__main__":
    main()

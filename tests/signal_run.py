"""Test helper: run a tests/test_resume.py config and send this process a signal at a step.

    python tests/signal_run.py DATA_ROOT WORKDIR SIGKILL|SIGTERM N

The signal is raised just before this attempt's N-th train step runs: SIGKILL kills the run
there (no chance to clean up); SIGTERM asks it to save and stop (preemption).
"""

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


def main(root, workdir, signame, at):
    sig, at = getattr(signal, signame), int(at)
    make_train_step = loop.make_train_step

    def make_signalling_step(*args, **kwargs):
        step = make_train_step(*args, **kwargs)
        calls = [0]

        def signalling_step(state, batch, n_replay):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), sig)
            return step(state, batch, n_replay)

        return signalling_step

    loop.make_train_step = make_signalling_step
    try:
        loop.run(test_resume.resume_config(Path(root)), workdir)
    except Preempted as e:
        print(e, file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:])

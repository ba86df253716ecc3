"""Replay policies in the training loop: a run killed between a task boundary (where the
pool is chosen) and the next checkpoint resumes to the same end, bit for bit; DER keeps
the logits of exactly the buffer's rows."""

import jax
import numpy as np
import pytest

from cpt_jax.replay.buffer import ReplayPool
from cpt_jax.train import loop
from cpt_jax.train.checkpoint import RunCheckpointer
from cpt_jax.train.setup import prepare_run
from tests.test_train_loop import _config

pytestmark = pytest.mark.slow


class Killed(Exception):
    pass


def _policy_config(tmp_path):
    """Hybrid of a coreset (features, loss weights) and a reservoir (a pool built on the
    previous one), with DER on the buffer; checkpoints only at task ends."""
    c = _config(tmp_path)
    c.tasks = [{"domain": "en", "steps": 6}, {"domain": "num", "steps": 6},
               {"domain": "sym", "steps": 6}]
    c.replay.update(dict(policy="hybrid", buffer_rows=8))
    c.replay.hybrid.update(dict(policies=["craig", "reservoir"], shares=[0.5, 0.5]))
    c.replay.coreset.update(dict(candidates=32, feature_dim=16))
    c.method.name = "replay+der"
    c.method.der.update(dict(weight=0.5, k=4))
    c.checkpoint.update(dict(every=0, async_save=False))
    return c


def _final(workdir, item="state"):
    ckpt = RunCheckpointer(str(workdir / "checkpoints"), read_only=True)
    return ckpt.read_arrays(ckpt.latest_step(), item)


def test_kill_after_a_boundary_resumes_bit_identically_and_der_keeps_the_buffer(
        tmp_path, monkeypatch):
    c = _policy_config(tmp_path)
    ref = loop.run(c, str(tmp_path / "ref"))

    # the killed run dies at task 2's first checkpoint hook, after the boundary chose the
    # pool and a step trained on it, before anything was saved
    started = {}
    start_task, checkpoint = loop.Trainer.start_task, loop.Trainer.checkpoint

    def watch_start(self, info):
        start_task(self, info)
        started[info.task] = True

    def die(self, info):
        if started.get(2):
            raise Killed
        checkpoint(self, info)

    monkeypatch.setattr(loop.Trainer, "start_task", watch_start)
    monkeypatch.setattr(loop.Trainer, "checkpoint", die)
    with pytest.raises(Killed):
        loop.run(c, str(tmp_path / "killed"))
    monkeypatch.undo()
    resumed = loop.run(c, str(tmp_path / "killed"))

    assert resumed["loss_matrix"] == ref["loss_matrix"]
    a, b = _final(tmp_path / "ref"), _final(tmp_path / "killed")
    for x, y in zip(*(jax.tree.leaves(s["params"]) for s in (a, b))):
        np.testing.assert_array_equal(x, y)

    # DER holds the logits of exactly the rows of the last pool
    pool_arrays = dict(_final(tmp_path / "ref", "pool"))
    assert int(pool_arrays.pop("task")) == 2
    pool = ReplayPool.from_arrays(pool_arrays)
    assert pool.memory_rows() <= 8 and pool.weighted  # the coreset half has weights
    starts = prepare_run(c, str(tmp_path / "ref")).sampler.starts
    der = _final(tmp_path / "ref", "methods")["der"]
    stored = {int(starts[d]) + int(r) for d in range(3) for r in np.asarray(
        der.get(f"rows_{d}", []))}
    assert stored == set(pool.all_rows().tolist())

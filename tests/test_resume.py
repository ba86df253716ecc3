"""Checkpoints and resume: a killed or preempted run, resumed, ends bit-identical to one
that never stopped; a changed config, a full disk or an unwritable workdir are refused
without harming what is on disk."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cpt_jax.optim.transforms import schedule_count
from cpt_jax.train import checkpoint as checkpoint_lib
from cpt_jax.train.loop import prepare_run, run, run_start
from cpt_jax.train.resume import ConfigMismatch, config_diff
from test_train_loop import _config

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` skips it in the inner loop

HERE = os.path.dirname(os.path.abspath(__file__))


def resume_config(root):
    """Tiny 3-task run whose state has every kind of part a checkpoint must carry: Adam
    moments, Reptile slow weights, EWC Fisher and anchor, a teacher snapshot and DER's
    stored logits. Task ends at steps 8, 14, 20; checkpoints every 3 steps."""
    c = _config(root)
    c.method.name = "replay+reptile+ewc+distill+der"
    c.method.reptile.periods = [{"every": 2, "meta_lr": 0.5}]
    c.method.ewc.update(dict(lam=10.0, rows=8, chunk=4))
    c.method.distill.update(dict(weight=0.5, temperature=2.0))
    c.method.der.update(dict(weight=0.5, k=4, rows_per_domain=1024))  # every row: always active
    c.checkpoint.update(dict(every=3, keep=2))
    c.save_final_params = True
    return c


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (data root, its workdir)."""
    root = tmp_path_factory.mktemp("resume")
    run(resume_config(root), str(root / "ref"))
    return root, root / "ref"


def _signal_run(root, workdir, signame, at):
    """tests/run_worker.py in a subprocess (8 devices, as here), signalled at step `at`."""
    env = dict(os.environ)  # conftest's XLA_FLAGS: the same compiler as the reference run
    return subprocess.run([sys.executable, os.path.join(HERE, "run_worker.py"), str(root),
                           str(workdir), "--signal", signame, "--at", str(at)],
                          capture_output=True, text=True, timeout=600, env=env)


def _params(workdir):
    return checkpoint_lib.load_params(workdir / "final_params")[1]


def _step_losses(workdir):
    """{step: training loss} from metrics.jsonl."""
    out = {}
    for line in open(workdir / "metrics.jsonl"):
        m = json.loads(line)
        if "loss" in m:
            out[m["step"]] = m["loss"]
    return out


def test_kill_preempt_and_resume_is_bit_identical(reference):
    root, ref = reference
    work = root / "killed"
    # SIGKILL before the 7th step: checkpoints 3 and 6 may or may not be complete
    proc = _signal_run(root, work, "SIGKILL", 7)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (work / "results.json").exists()
    killed_at = checkpoint_lib.RunCheckpointer(work / "checkpoints").latest_step()
    assert killed_at in (3, 6)  # in task 0: the resume crosses the 8-step task boundary

    # resumed, then SIGTERM'd 6 steps later, in task 1: it saves that step and exits 0
    proc = _signal_run(root, work, "SIGTERM", 6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stop = killed_at + 6
    assert f"preempted: stopped, and the newest checkpoint is step {stop}" in proc.stderr
    assert checkpoint_lib.RunCheckpointer(work / "checkpoints").latest_step() == stop
    assert not (work / "results.json").exists()

    res = run(resume_config(root), str(work))  # resumed in-process to the end
    assert (work / "results.json").read_bytes() == (ref / "results.json").read_bytes()
    assert res["loss_matrix"] == json.loads((ref / "results.json").read_text())["loss_matrix"]
    got, want = _params(work), _params(ref)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w)
    # every step's training loss was logged once, and equals the uninterrupted run's
    assert _step_losses(work) == _step_losses(ref)
    # kept: the last 2 plus every task end
    steps = checkpoint_lib.RunCheckpointer(work / "checkpoints").step_dirs()
    assert {8, 14, 20} <= set(steps) and len(set(steps) - {8, 14, 20}) <= 2


def test_every_method_term_was_active(reference):
    """The reference run really exercised what its checkpoints must carry: replayed rows
    got distillation and DER terms once there was something to replay, never before."""
    _, ref = reference
    logged = [json.loads(line) for line in open(ref / "metrics.jsonl")]
    first = [m for m in logged if m.get("task") == "en" and "loss" in m]
    later = [m for m in logged if m.get("task") in ("num", "sym") and "loss" in m]
    assert first and later
    assert all(m.get("der_replay", 0) == 0 and m.get("distill_replay", 0) == 0 for m in first)
    assert any(m.get("der_replay", 0) > 0 for m in later)
    assert any(m.get("distill_replay", 0) > 0 for m in later)


def test_resume_refuses_a_changed_config(reference, tmp_path):
    root, ref = reference
    work = tmp_path / "w"
    shutil.copytree(ref, work)
    before = (work / "results.json").read_bytes()
    c = resume_config(root)
    c.optim.lr = 1e-2
    with pytest.raises(ConfigMismatch, match=r"optim.lr: 0.003 -> 0.01.*--allow_config_change"):
        run(c, str(work))
    assert (work / "results.json").read_bytes() == before
    # a workdir with results but no checkpoints is not overwritten by another config either
    other = tmp_path / "results_only"
    other.mkdir()
    shutil.copy(ref / "results.json", other / "results.json")
    with pytest.raises(ConfigMismatch, match=r"results_only \(its results.json\).*optim.lr"):
        run(c, str(other))
    assert (other / "results.json").read_bytes() == before
    # told to, it resumes (the run is complete: nothing left to train)
    res = run(c, str(work), allow_config_change=True)
    assert res["config"]["optim"]["lr"] == 1e-2
    # placement keys may change freely
    assert config_diff({"mesh": {"data": 8}, "seed": 0}, {"mesh": {"data": 2}, "seed": 0}) == []
    assert config_diff({"seed": 0}, {"seed": 1}) == ["seed"]


def test_resume_on_another_mesh_and_device_count(reference, tmp_path):
    """Resume the 8-device run from its task-0 checkpoint on a 2x4 (data, fsdp) mesh of the
    same 8 devices, then on a 2x2 mesh of 4 devices: arrays are restored into the new
    shardings and the run ends where the 8x1 run did, up to rounding."""
    root, ref = reference
    want = json.loads((ref / "results.json").read_text())["loss_matrix"]
    work = tmp_path / "w"
    shutil.copytree(ref, work)
    for step in checkpoint_lib.RunCheckpointer(work / "checkpoints").step_dirs():
        if step > 8:
            shutil.rmtree(work / "checkpoints" / str(step))
    (work / "results.json").unlink()
    four = tmp_path / "w4"
    shutil.copytree(work, four)

    c = resume_config(root)
    c.mesh.update(dict(data=2, fsdp=4))
    parts = prepare_run(c, str(work))
    ckpt = checkpoint_lib.RunCheckpointer(work / "checkpoints", read_only=True)
    state, progress, _ = run_start(c, parts, ckpt, [8])
    assert (progress.task, progress.step, progress.global_step) == (1, 0, 8)
    kernel = state.params["layers"]["mlp"]["up"]["kernel"]
    assert kernel.sharding.spec == parts.shardings.params["layers"]["mlp"]["up"]["kernel"].spec
    assert kernel.sharding.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
    res = run(c, str(work))
    np.testing.assert_allclose(res["loss_matrix"], want, rtol=2e-4)

    env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(
        "device_count=8", "device_count=4"))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "run_worker.py"), str(root),
                           str(four), "--mesh", "data=2,fsdp=2"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((four / "results.json").read_text())
    assert got["config"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    np.testing.assert_allclose(got["loss_matrix"], want, rtol=2e-4)


def test_start_from_another_runs_full_state(reference, tmp_path):
    root, ref = reference
    c = resume_config(root)
    c.init.checkpoint = str(ref / "checkpoints" / "8")
    c.init.continue_schedule = True  # the whole state, schedule position included
    parts = prepare_run(c, str(tmp_path))
    state, progress, _ = run_start(c, parts, None, None)
    assert progress.global_step == 0 and progress.task == 0
    source = checkpoint_lib.RunCheckpointer(ref / "checkpoints", read_only=True)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    want, _, _, _ = source.restore(8, abstract)
    for g, w in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert int(state.step) == 8
    # by default a new run restarts its schedule; everything else is the same state
    c.init.continue_schedule = False
    fresh, _, _ = run_start(c, parts, None, None)
    assert int(fresh.step) == 0 and int(schedule_count(fresh.opt_state)) == 0
    assert int(schedule_count(state.opt_state)) == 8
    for g, w in zip(jax.tree.leaves(fresh.params), jax.tree.leaves(want.params)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

    c.model.d_ff = 128  # another model: refused naming the key, before anything is built
    with pytest.raises(ValueError, match=r"model.d_ff=128 contradicts the checkpoint "
                                         r"init.checkpoint=.*8 \(d_ff=96 in the run that "
                                         r"wrote it\)"):
        prepare_run(c, str(tmp_path))


def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path):
    ckpt = checkpoint_lib.RunCheckpointer(tmp_path / "ck", keep=3)
    x = {"w": jax.random.normal(jax.random.key(0), (256, 256))}
    ckpt.save(1, x, {"step": 1}, {"seed": 0}, wait=True)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, hard))  # files over 16 KiB fail
    try:
        with pytest.raises(checkpoint_lib.CheckpointError,
                           match=r"(?s)step 2 .*File too large.*checkpoint \(step 1\) is intact"):
            ckpt.save(2, {"w": x["w"] * 2}, {"step": 2}, {"seed": 0}, wait=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    again = checkpoint_lib.RunCheckpointer(tmp_path / "ck")
    assert again.step_dirs() == [1]
    target = {"w": jax.ShapeDtypeStruct((256, 256), np.float32,
                                        sharding=x["w"].sharding)}
    state, progress, _, _ = again.restore(1, target)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(x["w"]))
    assert progress == {"step": 1}


def test_unwritable_workdir_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"workdir .*a_file/run is not a writable directory"):
        run(_config(tmp_path), str(blocker / "run"))
    assert blocker.read_text() == "not a directory"


def test_a_config_key_added_since_with_an_empty_value_is_no_change():
    """A workdir written before replay.sources existed resumes under the new default []."""
    old = {"replay": {"rate": 0.25}}
    assert config_diff(old, {"replay": {"rate": 0.25, "sources": []}}) == []
    assert config_diff(old, {"replay": {"rate": 0.25, "sources": ["en"]}}) == ["replay.sources"]

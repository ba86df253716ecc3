"""WandbLogger in offline mode, read back from wandb's own transaction log (no network).

The reference is what wandb wrote: the ``run-ID.wandb`` file of each offline run, a
LevelDB-style log of ``wandb_internal_pb2.Record`` messages. Recent wandb versions (0.31
here) have no Python reader of it any more, so ``_records`` below reads the framing,
checking every chunk's CRC, and wandb's own protobuf decodes the records."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import struct
import sys
import time
import zlib

import ml_collections
import numpy as np
import pytest

from cpt_jax.eval import wandb_logger
from cpt_jax.eval.wandb_logger import WandbLogger

try:
    import wandb
    from wandb.proto import wandb_internal_pb2
except ImportError:  # the tests of checks and no-op loggers run without it
    wandb = None
needs_wandb = pytest.mark.skipif(wandb is None, reason="needs wandb: pip install -e '.[test]'")


@dataclasses.dataclass
class FakeInfo:
    task: int
    name: str
    global_step: int
    end_of_task: bool
    event: str
    metrics: dict
    logged: dict


@pytest.fixture(autouse=True)
def _offline_env(tmp_path, monkeypatch):
    # wandb.init replaces sys.exit and sys.excepthook (with wrappers that record the exit
    # code) and adds an import hook, for good: give the later tests of the suite the originals
    for name in ("exit", "excepthook"):
        monkeypatch.setattr(sys, name, getattr(sys, name))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))


def _config(**logging):
    c = ml_collections.ConfigDict()
    c.seed = 7
    c.optim = ml_collections.ConfigDict(dict(lr=3e-4, schedule="cosine"))
    c.tasks = [{"name": "prose", "steps": 3}, {"name": "code", "steps": 4}]
    c.param_dtype = np.float32  # not JSON: to_json() would fail
    c.logging = wandb_logger.default_config()
    c.logging.update(dict(wandb=True, mode="offline", project="cpt_test"), **logging)
    return c


def _records(path):
    """wandb_internal_pb2.Record messages of a .wandb file: a 7-byte file header
    (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte
    header (CRC-32 of type byte + data, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    block, pos, parts = 32768, 7, []
    while pos < len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind == 0 and n == 0:
            continue
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad CRC at byte {pos}"
        parts.append(chunk)
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _fragments(workdir, run_id):
    """The offline runs (fragments) of ``run_id`` in WORKDIR/wandb, oldest first.

    ``run.finish()`` in offline mode may return before wandb's service process has written
    the transaction log (it does at the latest when the service ends, at process exit):
    ``wandb.teardown()`` waits for that."""
    wandb.teardown()
    paths = sorted(glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{run_id}",
                                          f"run-{run_id}.wandb")))
    assert paths, os.listdir(workdir)
    return paths


def _read(path):
    """(run record, {step: {key: value}} of the history rows, without wandb's _ keys)."""
    run, history = None, {}
    for r in _records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
        elif kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                   for i in r.history.item}
            step = row["_step"]
            assert step == r.history.step.num and step not in history
            history[step] = {k: v for k, v in row.items() if not k.startswith("_")}
    return run, history


def _next_second():
    """wandb names an offline run's folder by its start time to the second: a resumed
    attempt started within the same second would share its predecessor's folder."""
    t = time.time()
    time.sleep(math.ceil(t) - t + 0.01)


def _exit_code(path):
    (code,) = [r.exit.exit_code for r in _records(path) if r.WhichOneof("record_type") == "exit"]
    return code


def _drive(logger, events):
    for step, event, logged in events:
        logger(FakeInfo(task=0, name="prose", global_step=step, end_of_task=event == "task_end",
                        event=event, metrics={}, logged=logged))


@needs_wandb
def test_history_matches_what_was_logged(tmp_path):
    workdir = str(tmp_path / "run_a")
    logger = WandbLogger(_config(tags=["replay", "tiny"]), workdir)
    events = [
        (0, "task_start", {}),
        (1, "step", {}),
        (2, "step", {"step": 2, "task": "prose", "loss": 3.5, "tokens_per_s": 1234.5,
                     "grad_norm": 0.75, "lr": 1e-4}),
        (3, "step", {"step": 3, "task": "prose", "loss": 3.25, "tokens_per_s": 1200.0,
                     "grad_norm": 0.5, "lr": 2e-4, "finite": True}),
        (3, "task_end", {"task": "prose", "eval/prose": 3.125, "eval/code": 4.0,
                         "replay_buffer_rows": 96}),
        (4, "step", {}),
        (5, "step", {"step": 5, "task": "code", "loss": float("nan"), "lr": 3e-4}),
    ]
    _drive(logger, events)
    run_id = logger.run_id
    logger.close()
    logger.close()  # a second close does nothing

    (path,) = _fragments(workdir, run_id)
    run, history = _read(path)
    assert history == {
        2: {"loss": 3.5, "tokens_per_s": 1234.5, "grad_norm": 0.75, "lr": 1e-4},
        3: {"loss": 3.25, "tokens_per_s": 1200.0, "grad_norm": 0.5, "lr": 2e-4,
            "eval/prose": 3.125, "eval/code": 4.0, "replay_buffer_rows": 96},
        5: {"loss": pytest.approx(math.nan, nan_ok=True), "lr": 3e-4},
    }
    assert run.run_id == run_id and run.project == "cpt_test"
    assert run.display_name == "run_a" and list(run.tags) == ["replay", "tiny"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["seed"] == 7 and config["optim"] == {"lr": 3e-4, "schedule": "cosine"}
    assert config["logging"]["project"] == "cpt_test" and "float32" in config["param_dtype"]
    assert _exit_code(path) == 0
    with open(os.path.join(workdir, "wandb_id")) as f:
        assert f.read().strip() == run_id


@needs_wandb
def test_resume_rewinds_the_same_run(tmp_path):
    workdir = str(tmp_path / "run_r")
    first = WandbLogger(_config(), workdir)
    run_id = first.run_id
    # the killed attempt logged steps 1..6; its last checkpoint is at step 4
    _drive(first, [(s, "step", {"loss": 10.0 + s}) for s in range(1, 7)])
    first.close()
    _next_second()

    second = WandbLogger(_config(), workdir, resume_step=5)
    assert second.run_id == run_id
    _drive(second, [(4, "task_start", {"replay_pool_s": 0.5}),  # the checkpoint's own step
                    *[(s, "step", {"loss": 20.0 + s}) for s in range(5, 9)]])
    second.close()

    frag1, frag2 = _fragments(workdir, run_id)
    run1, hist1 = _read(frag1)
    run2, hist2 = _read(frag2)
    assert run1.run_id == run2.run_id == run_id
    assert hist1 == {s: {"loss": 10.0 + s} for s in range(1, 7)}
    # the new fragment rewinds the run to step 4 and holds steps 5.. of this attempt
    assert (run2.branch_point.run, run2.branch_point.metric, run2.branch_point.value) == (
        run_id, "_step", 4)
    assert hist2 == {s: {"loss": 20.0 + s} for s in range(5, 9)}

    # a fresh run in the same workdir starts a new wandb run
    fresh = WandbLogger(_config(), workdir)
    assert fresh.run_id != run_id
    fresh.close()
    assert wandb_logger.read_run_id(workdir) == fresh.run_id


@needs_wandb
@pytest.mark.parametrize("how", ["refused", "rewind_off"])
def test_resume_without_rewind(tmp_path, monkeypatch, how):
    """A server that refuses the rewind, or logging.rewind=False: resume="allow"."""
    workdir = str(tmp_path / "run_f")
    first = WandbLogger(_config(), workdir)
    run_id = first.run_id
    _drive(first, [(1, "step", {"loss": 1.0}), (2, "step", {"loss": 2.0})])
    first.close()

    if how == "refused":
        init = wandb.init

        def no_rewind(**kwargs):
            if kwargs.get("resume_from"):
                raise wandb.errors.CommError("rewinding is not enabled")
            return init(**kwargs)

        monkeypatch.setattr(wandb, "init", no_rewind)
    _next_second()
    second = WandbLogger(_config(rewind=how != "rewind_off"), workdir, resume_step=2)
    assert second.run_id == run_id
    _drive(second, [(1, "step", {"loss": 9.0}), (2, "step", {"loss": 2.5}),
                    (3, "step", {"loss": 3.0})])
    second.close()
    run2, hist2 = _read(_fragments(workdir, run_id)[1])
    assert run2.resume and not run2.HasField("branch_point")
    # offline, wandb knows no earlier steps: this attempt's rows from resume_step on
    assert hist2 == {2: {"loss": 2.5}, 3: {"loss": 3.0}}


@needs_wandb
def test_close_on_an_error_marks_the_run_failed(tmp_path):
    workdir = str(tmp_path / "run_e")
    logger = WandbLogger(_config(), workdir)
    with pytest.raises(FloatingPointError):
        try:
            _drive(logger, [(1, "step", {"loss": 1.0})])
            raise FloatingPointError("loss diverged")
        finally:
            logger.close()  # as the trainer's finally calls it
    (path,) = _fragments(workdir, logger.run_id)
    assert _exit_code(path) == 1 and _read(path)[1] == {1: {"loss": 1.0}}


@pytest.mark.parametrize("how", ["disabled", "inactive", "WANDB_MODE=disabled"])
def test_noop_logger_writes_nothing(tmp_path, monkeypatch, how):
    monkeypatch.setitem(sys.modules, "wandb", None)  # a no-op logger needs no wandb
    workdir = tmp_path / "run_n"
    config = _config(mode="disabled") if how == "disabled" else _config()
    if how == "WANDB_MODE=disabled":
        monkeypatch.setenv("WANDB_MODE", "disabled")
        config.logging.mode = ""
    logger = WandbLogger(config, str(workdir), active=how != "inactive", resume_step=3)
    _drive(logger, [(3, "step", {"loss": 1.0})])
    logger.close()
    assert logger.run_id is None and not workdir.exists()


def test_missing_wandb_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    hint = "logging.wandb=True needs the wandb package: pip install 'cpt_jax[wandb]'"
    with pytest.raises(ImportError) as e:
        WandbLogger(_config(), str(tmp_path / "run_m"))
    assert str(e.value) == hint
    with pytest.raises(ValueError) as e:
        wandb_logger.check(_config())
    assert str(e.value) == hint
    wandb_logger.check(_config(wandb=False))  # not needed when off


@pytest.mark.parametrize("key, value, message", [
    ("mode", "x", "logging.mode='x': use 'online', 'offline' or 'disabled'"),
    ("wandb", "yes", "logging.wandb='yes': use True or False"),
    ("rewind", 1, "logging.rewind=1: use True or False"),
    ("project", "a/b", "logging.project='a/b': use a name of 1 to 128 characters"),
    ("project", "", "logging.project='': use a name"),
    ("entity", 3, "logging.entity=3: use a string"),
    ("tags", ["ok", ""], "logging.tags=['ok', '']: use strings of 1 to 64 characters"),
    ("tags", "replay", "logging.tags='replay': use strings"),
    ("colour", "red", "logging.colour is not a logging key: use one of"),
])
def test_bad_key_is_one_line(key, value, message):
    config = _config()
    bad = config.logging.to_dict()
    bad[key] = value  # as a config file may set it (no type check against the default)
    config.logging = ml_collections.ConfigDict(bad)
    with pytest.raises(ValueError) as e:
        wandb_logger.check(config)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    wandb_logger.check(_config(wandb=False))
    wandb_logger.check(_config(wandb=False).logging)


def test_default_config_is_off():
    c = wandb_logger.default_config()
    assert c.wandb is False and c.project == "cpt_jax" and c.tags == ()
    wandb_logger.check(ml_collections.ConfigDict({"logging": c}))

"""MetricsLogger: jsonl content, and TensorBoard scalars read back from the event files.

The event files are parsed here independently of the writer: TFRecord framing (uint64
length, masked crc32c of the length, payload, masked crc32c of the payload) checked with a
crc32c written in this file, payloads decoded as tensorboard ``Event`` protos.
"""

import glob
import math
import os
import struct

import numpy as np
import pytest

from cpt_jax.eval.logging import MetricsLogger, read_jsonl

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked(c: int) -> int:
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path):
    """All Event protos of one file, verifying the TFRecord framing and both checksums."""
    events = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (len_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        assert len_crc == masked(crc32c(header))
        payload = data[pos + 12:pos + 12 + length]
        (data_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert data_crc == masked(crc32c(payload))
        events.append(event_pb2.Event.FromString(payload))
        pos += 16 + length
    return events


def scalars_of(workdir):
    """{tag: [(step, value)]} over every event file in workdir, in file order."""
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        for ev in read_events(path):
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_crc32c_reference_value():
    # the standard check value of CRC-32C (RFC 3720 / iSCSI)
    assert crc32c(b"123456789") == 0xE3069283


def test_jsonl_and_tensorboard_round_trip(tmp_path):
    work = str(tmp_path / "run")
    with MetricsLogger(work) as log:
        log.log(10, {"loss": 2.5, "lr": np.float32(1e-3), "task": "prose",
                     "cos": np.array([0.5, -0.25]), "tokens": 4096})
        log.log(20, {"loss": np.array(1.75), "task": "code", "skipped": True, "step": 999})
    rec = read_jsonl(os.path.join(work, "metrics.jsonl"))
    assert rec[0] == {"step": 10, "loss": 2.5, "lr": pytest.approx(1e-3), "task": "prose",
                      "cos/0": 0.5, "cos/1": -0.25, "tokens": 4096}
    assert rec[1] == {"step": 20, "loss": 1.75, "task": "code", "skipped": True}

    tb = scalars_of(work)
    assert tb["loss"] == [(10, 2.5), (20, 1.75)]
    assert tb["lr"] == [(10, pytest.approx(1e-3))]
    assert tb["cos/0"] == [(10, 0.5)] and tb["cos/1"] == [(10, -0.25)]
    assert tb["tokens"] == [(10, 4096.0)]
    assert "task" not in tb and "skipped" not in tb  # strings and bools stay in the jsonl
    assert "step" not in tb


def test_fresh_run_replaces_and_resume_truncates(tmp_path):
    work = str(tmp_path)
    with MetricsLogger(work, tensorboard=False) as log:
        for s in (1, 2, 3):
            log.log(s, {"loss": float(s)})
    with open(os.path.join(work, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "lo')  # cut short by a preemption
    with MetricsLogger(work, tensorboard=False, resume_step=3) as log:
        log.log(3, {"loss": 30.0})
    assert [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(work, "metrics.jsonl"))] \
        == [(1, 1.0), (2, 2.0), (3, 30.0)]
    with MetricsLogger(work, tensorboard=False) as log:  # a fresh run starts a new file
        log.log(1, {"loss": float("nan")})
    rec = read_jsonl(os.path.join(work, "metrics.jsonl"))
    assert len(rec) == 1 and math.isnan(rec[0]["loss"])


def test_resume_purges_tensorboard_steps(tmp_path):
    work = str(tmp_path)
    with MetricsLogger(work) as log:
        for s in (1, 2, 3):
            log.log(s, {"loss": float(s)})
    with MetricsLogger(work, resume_step=2) as log:
        log.log(2, {"loss": 20.0})
    # both attempts are on disk; the second starts with a purge marker at step 2, which
    # TensorBoard applies by dropping the first attempt's events at steps >= 2.
    events = [ev for p in sorted(glob.glob(os.path.join(work, "events.out.tfevents.*")))
              for ev in read_events(p)]
    starts = [ev.step for ev in events if ev.HasField("session_log")
              and ev.session_log.status == event_pb2.SessionLog.START]
    assert starts == [2]


def test_inactive_logger_writes_nothing_and_closed_logger_refuses(tmp_path):
    log = MetricsLogger(str(tmp_path / "w"), active=False)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "w").exists()
    log = MetricsLogger(str(tmp_path / "v"), tensorboard=False)
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.log(1, {"loss": 1.0})

"""End to end: one run trains a mixture task (jsonl.zst + save_to_disk) and a plain task
(text files) while replaying a Parquet replay source, with a held-out jsonl.gz domain;
every domain is a column of the loss matrix, the mixture's new tokens follow its weights,
the source is replayed and never trained, and the metrics count it."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpt_jax.run_config import default_config
from cpt_jax.train.loop import run

WORDS = {"orig": "the cat sat on a mat and dog ran".split(),
         "web": [str(i) for i in range(10)],
         "wiki": list("abcdefghij"),
         "code": ["<", ">", "=", "+", "{", "}", "(", ")", ";"],
         "held": ["alpha", "beta", "gamma", "delta"]}


def _docs(name, n=50):
    vocab = WORDS[name]
    return [" ".join(vocab[(d * 7 + i * 3) % len(vocab)] for i in range(30)) for d in range(n)]


def _write(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    domains = []
    for s, part in enumerate((_docs("orig")[:25], _docs("orig")[25:])):
        pq.write_table(pa.table({"text": part}), tmp_path / f"orig-{s}.parquet",
                       row_group_size=7)
    domains.append({"name": "orig", "kind": "parquet",
                    "pattern": str(tmp_path / "orig-*.parquet")})
    lines = "".join(json.dumps({"text": t}) + "\n" for t in _docs("web"))
    (tmp_path / "web.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    domains.append({"name": "web", "kind": "jsonl", "pattern": str(tmp_path / "web.jsonl.zst")})
    try:
        import datasets  # pylint: disable=import-outside-toplevel
        datasets.Dataset.from_dict({"text": _docs("wiki")}).save_to_disk(str(tmp_path / "wiki"))
        domains.append({"name": "wiki", "kind": "hf_dataset", "path": str(tmp_path / "wiki")})
    except ImportError:  # the same Arrow stream format, written by pyarrow
        table = pa.table({"text": _docs("wiki")})
        with pa.OSFile(str(tmp_path / "wiki.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        domains.append({"name": "wiki", "kind": "hf_dataset",
                        "path": str(tmp_path / "wiki.arrow")})
    (tmp_path / "code").mkdir()
    for i, t in enumerate(_docs("code")):
        (tmp_path / "code" / f"{i:03d}.txt").write_text(t)
    domains.append({"name": "code", "kind": "text_glob",
                    "pattern": str(tmp_path / "code" / "*.txt")})
    with gzip.open(tmp_path / "held.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in _docs("held"))
    domains.append({"name": "held", "kind": "jsonl", "pattern": str(tmp_path / "held.jsonl.gz")})
    return domains


def test_mixture_source_and_heldout_in_one_run(tmp_path, capsys):
    c = default_config()
    c.model.update(dict(vocab_size=320, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                        d_ff=64, max_seq_len=64))
    c.seq_len, c.global_batch = 16, 8
    c.data.domains = _write(tmp_path)
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.val_fraction = 0.2
    c.tasks = [{"domains": {"web": 0.75, "wiki": 0.25}, "steps": 8},
               {"domain": "code", "steps": 4}]
    c.replay.update(dict(rate=0.25, sources=["orig"]))
    c.eval.update(dict(every=0, max_rows=8, batch=8))
    c.checkpoint.update(dict(every=0, async_save=False))
    res = run(c, str(tmp_path / "work"))
    assert "has no effect" not in capsys.readouterr().err  # task 0 replays the source

    names = ["orig", "web", "wiki", "code", "held"]
    assert res["columns"] == names and res["tasks"] == ["web+wiki", "code"]
    assert res["column_kinds"] == {"orig": "replay_source", "web": "task", "wiki": "task",
                                   "code": "task", "held": "heldout"}
    R = np.asarray(res["loss_matrix"])
    assert R.shape == (2, 5)
    start = np.asarray([res["init_losses"][n] for n in names])

    compute, L = res["compute"], c.seq_len
    new = {d: v // L for d, v in compute["new_tokens_by_domain"].items()}
    replayed = {d: v // L for d, v in compute["replay_tokens_by_domain"].items()}
    # additive accounting, 2 of 8 rows replayed: task 0 takes ceil(64 / 6) = 11 steps
    steps0 = res["task_stats"][0]["steps"]
    assert steps0 == 11 and sorted(new) == ["code", "web", "wiki"]
    assert new["web"] + new["wiki"] == 6 * steps0
    assert abs(new["web"] - 0.75 * 6 * steps0) <= 2
    assert "orig" not in new and "held" not in new and "held" not in replayed
    assert res["task_stats"][0]["replay_tokens_by_domain"] == {"orig": 2 * steps0 * L}
    assert replayed["orig"] > 2 * steps0 and sum(replayed.values()) * L == compute[
        "replay_tokens"]

    m = res["metrics"]
    earlier = [0, 1, 2]  # the source, then task 0's components
    assert m["retained_loss"] == pytest.approx(R[1, earlier].mean())
    forget = [R[1, 0] - min(R[0, 0], start[0]), R[1, 1] - R[0, 1], R[1, 2] - R[0, 2]]
    assert m["forgetting"] == pytest.approx(np.mean(forget))
    assert m["learned_loss"] == pytest.approx(
        (0.75 * R[0, 1] + 0.25 * R[0, 2] + R[1, 3]) / 2)
    assert m["heldout_change"]["per_domain"]["held"] == pytest.approx(R[1, 4] - start[4])

    metas = [json.load(open(p)) for p in (tmp_path / "cache").glob("*/meta.json")]
    held = [m for m in metas if m["name"] == "held"]
    assert held and held[0]["splits"]["train"]["rows"] == 0 < held[0]["splits"]["val"]["rows"]

    from cpt_jax.eval.report import write_report  # pylint: disable=import-outside-toplevel
    md = open(write_report([str(tmp_path / "work")], str(tmp_path / "report"))["files"][
        "report.md"]).read()
    assert ("| after | orig (replay source) | web | wiki | code | held (held out) |" in md)
    assert f"| start | {start[0]:.3f} |" in md
    assert "held-out change (final minus start): held " in md

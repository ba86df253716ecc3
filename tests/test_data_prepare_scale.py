"""Preparation at scale: the same files for any number of workers and shards, content
fingerprints (a touched or copied corpus is recognised), files read in bounded parts
(tokens equal to whole-file encoding), symlink loops, duplicates and the split, dead
preparations' temporary folders, and clean stops on SIGTERM / Ctrl-C."""

import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cpt_jax.data import prepare, sources
from cpt_jax.data import tokenizer as tk
from cpt_jax.data.sources import text_glob
from tiny_runs import demo_tokenizer, load_script

SEQ_LEN = 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["alpha", "beta", "gamma", "delta", "x = 1", "(y)", "\n", "\n\n", "déjà", "🦙",
         "  ", "#"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


def _text(n_words, seed=0):
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n_words))


def _write_docs(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        (folder / f"{i:04d}.txt").write_text(_text(int(rng.integers(1, 120)), seed + i))
    return {"name": "toy", "kind": "text_glob", "pattern": str(folder / "*.txt")}


def _files(folder):
    """{file name: bytes} of a prepared folder."""
    return {os.path.basename(p): open(p, "rb").read()
            for p in sorted(glob.glob(os.path.join(folder, "*")))}


def _config(tmp_path, domain, tok):
    path = tmp_path / "cfg.py"
    path.write_text(
        "from cpt_jax.run_config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        f"    c.model.vocab_size, c.seq_len = 400, {SEQ_LEN}\n"
        f"    c.tokenizer.path = {tok.path!r}\n"
        f"    c.data.domains = [{domain!r}]\n"
        "    return c\n")
    return str(path)


def test_same_files_for_any_workers_and_shards(tok, tmp_path, monkeypatch, capsys):
    """1 and 3 workers, and --shard 0/2 + --shard 1/2 + --finalize, write the same bytes;
    the rows hold every document's own encoding, in source order."""
    monkeypatch.setattr(prepare, "SHARD_CHARS", 4000, raising=False)  # several units
    monkeypatch.setattr(prepare, "POOL_MIN_CHARS", 0, raising=False)  # a pool, tiny data
    domain = _write_docs(tmp_path / "src", 80)
    script = load_script("prepare_data")
    config = _config(tmp_path, domain, tok)
    run = lambda cache, *extra: script.main(  # noqa: E731
        ["--config", config, f"--config.data.cache_dir={tmp_path / cache}", "--no_progress",
         *extra])
    one = run("one", "--config.data.workers=1")["toy"]["dir"]
    three = run("three", "--config.data.workers=3")["toy"]["dir"]
    run("shards", "--shard", "1/2")
    with pytest.raises(prepare.PrepareError, match=r"units 0, 2, 4.* --shard i/n"):
        run("shards", "--finalize")
    run("shards", "--shard", "0/2", "--config.data.workers=2")
    finalized = run("shards", "--finalize")["toy"]["dir"]
    files = _files(one)
    assert sum(name.startswith("train-") for name in files) >= 3
    assert _files(three) == files and _files(finalized) == files
    assert os.path.basename(finalized) == os.path.basename(one)
    assert not glob.glob(str(tmp_path / "shards" / ".*"))  # staging folder gone

    # Independent reference: each split's rows are the documents' own encodings.
    out = prepare.prepare_domain(domain, tok, str(tmp_path / "one"), SEQ_LEN,
                                 val_fraction=0.05, progress=False)
    docs = [open(p).read() for p in sorted(glob.glob(domain["pattern"]))]
    val = {d for d in docs if prepare.split_score(d, 0) < 0.05}
    for split, rows in out.items():
        tokens, segs = rows.read(np.arange(len(rows)))
        want = [[tok.bos_id, *tok.encode(d), tok.eos_id] for d in docs
                if d and (d in val) == (split == "val")]
        assert tokens[segs > 0].tolist() == [t for w in want for t in w]
    capsys.readouterr()


def test_touched_or_copied_corpus_is_the_same_data(tok, tmp_path, monkeypatch):
    """Fingerprints come from content: a touched corpus, or a copy elsewhere without its
    times, reuses the prepared folder and resumes; changed bytes (same size) are refused,
    naming the domain."""
    from cpt_jax.run_config import default_config
    from cpt_jax.train.resume import ConfigMismatch, check_same_data, data_fingerprints

    domain = _write_docs(tmp_path / "src", 20)
    data_dir = str(tmp_path / "data")
    first = prepare.prepare_domains([domain], tok, data_dir, SEQ_LEN, progress=False)
    folder = os.path.dirname(first["toy"]["train"].path)
    config = default_config()
    config.data.domains = [domain]
    config.data.cache_dir = data_dir
    stored = data_fingerprints(config)
    # A checkpoint from before content fingerprints (paths, sizes, mtimes) still resumes.
    old_style = {"files": [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns)
                           for p in sorted(glob.glob(domain["pattern"]))]}
    legacy = {"domain toy": hashlib.sha256(json.dumps(old_style, sort_keys=True).encode()
                                           ).hexdigest()}
    check_same_data(legacy, stored, "workdir w", allow=False)

    reads = []  # the documents preparation reads (none when the folder is reused)
    reader = ("iter_long_documents" if hasattr(sources, "iter_long_documents")
              else "iter_documents")
    real = getattr(sources, reader)
    monkeypatch.setattr(sources, reader, lambda d: (reads.append(d), real(d))[1])
    later = time.time() + 100
    for path in glob.glob(domain["pattern"]):
        os.utime(path, (later, later))  # touch
    touched = prepare.prepare_domains([domain], tok, data_dir, SEQ_LEN, progress=False)
    assert os.path.dirname(touched["toy"]["train"].path) == folder and reads == []
    check_same_data(stored, data_fingerprints(config), "workdir w", allow=False)
    assert os.path.isfile(os.path.join(data_dir, "file_hashes.json"))  # hashed once

    copy = tmp_path / "copy"
    copy.mkdir()
    for path in glob.glob(domain["pattern"]):
        shutil.copy(path, copy)  # new times, new place, same bytes
    moved = dict(domain, pattern=str(copy / "*.txt"))
    again = prepare.prepare_domains([moved], tok, data_dir, SEQ_LEN, progress=False)
    assert os.path.dirname(again["toy"]["train"].path) == folder and reads == []

    path = sorted(glob.glob(domain["pattern"]))[3]
    text = open(path).read()
    open(path, "w").write(text[::-1])  # same size, other bytes (and a new mtime)
    with pytest.raises(ConfigMismatch, match=r"domain toy changed"):
        check_same_data(stored, data_fingerprints(config), "workdir w", allow=False)
    changed = prepare.prepare_domains([domain], tok, data_dir, SEQ_LEN, progress=False)
    assert os.path.dirname(changed["toy"]["train"].path) != folder and reads


def test_symlink_loop_reads_each_file_once(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        (root / name).write_text(name)
    os.symlink(".", root / "self")  # a loop
    os.symlink(root / "sub", root / "again")  # a second way into a walked folder
    domain = {"name": "loop", "kind": "text_glob", "pattern": str(root / "**" / "*.txt")}
    files = sources.list_files(domain)
    assert [os.path.relpath(f, root) for f in files] == ["a.txt", "b.txt", "sub/c.txt"]
    assert sorted(sources.iter_documents(domain)) == ["a.txt", "b.txt", "sub/c.txt"]


def test_identical_documents_never_straddle_the_split(tok, tmp_path):
    """The fallback that fills an empty validation split moves every copy of the
    lowest-scoring document, not one of them."""
    docs = [_text(20, seed=s) for s in range(6)]
    low = min(docs, key=lambda d: prepare.split_score(d, 0))
    src = tmp_path / "src"
    src.mkdir()
    for i, doc in enumerate(docs + [low, low]):
        (src / f"{i:02d}.txt").write_text(doc)
    domain = {"name": "dup", "kind": "text_glob", "pattern": str(src / "*.txt")}
    out = prepare.prepare_domain(domain, tok, str(tmp_path / "data"), SEQ_LEN,
                                 val_fraction=1e-9, progress=False)  # no score below it
    low_ids = [tok.bos_id, *tok.encode(low), tok.eos_id]
    for split, copies in (("val", 3), ("train", 0)):
        tokens, segs = out[split].read(np.arange(len(out[split])))
        flat = tokens[segs > 0].tolist()
        found = sum(flat[i:i + len(low_ids)] == low_ids for i in range(len(flat)))
        assert found == copies, split
    assert out["val"].meta["splits"]["val"]["docs"] == 3


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    """The same model as a Hugging Face tokenizer.json (it prepends the space itself)."""
    out = str(tmp_path_factory.mktemp("hf_tok"))
    tok.save(out, model_max_length=128)
    os.remove(os.path.join(out, "tokenizer.model"))
    loaded = tk.load_tokenizer(out)
    assert loaded.kind == "hf_json"
    return loaded


@pytest.mark.parametrize("part_chars,kind", [(300, "sentencepiece"), (2000, "sentencepiece"),
                                             (300, "hf_json")])
def test_large_text_file_is_read_in_parts_with_whole_file_tokens(tok, hf_tok, tmp_path,
                                                                 monkeypatch, part_chars, kind):
    """A text file is read and tokenized in parts of about PART_CHARS characters (memory
    does not grow with the file); the parts end at paragraph / line / word boundaries and
    the rows hold exactly the whole file's encoding."""
    tok = hf_tok if kind == "hf_json" else tok
    monkeypatch.setattr(text_glob, "PART_CHARS", part_chars, raising=False)
    rng = np.random.default_rng(part_chars)
    paragraphs = [_text(int(rng.integers(5, 200)), seed=i) for i in range(60)]
    text = "\n\n".join(paragraphs)
    (tmp_path / "book.txt").write_text(text)
    domain = {"name": "book", "kind": "text_glob", "pattern": str(tmp_path / "book.txt")}
    parts = list(next(sources.iter_long_documents(domain)))
    assert "".join(parts) == text and len(parts) > 3
    assert max(len(p) for p in parts) <= 2 * part_chars
    out = prepare.prepare_domain(domain, tok, str(tmp_path / "data"), SEQ_LEN,
                                 val_fraction=0.1, progress=False)
    # One document: its tail is the validation split.
    rows = [out[s].read(np.arange(len(out[s]))) for s in ("train", "val")]
    got = np.concatenate([t[s > 0] for t, s in rows]).tolist()
    assert got == [tok.bos_id, *tok.encode(text), tok.eos_id]
    assert out["train"].meta["n_documents"] == 1


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_dead_preparations_temporary_folders_are_removed(tok, tmp_path):
    domain = _write_docs(tmp_path / "src", 5)
    data = tmp_path / "data"
    host = socket.gethostname()
    dead = data / f".tmp-toy-0123456789ab@{host}@{_dead_pid()}@0123abcd"
    live = data / f".tmp-toy-0123456789ab@{host}@{os.getpid()}@0123abcd"
    other_host = data / f".tmp-toy-0123456789ab@elsewhere@{_dead_pid()}@0123abcd"
    unit = data / ".parts-toy-0123456789ab" / f"unit-00001.tmp@{host}@{_dead_pid()}@01234567"
    for folder in (dead, live, other_host, unit):
        folder.mkdir(parents=True)
        (folder / "train.array_record").write_bytes(b"x" * 100)
    prepare.prepare_domains([domain], tok, str(data), SEQ_LEN, progress=False)
    assert not dead.exists() and not unit.exists()
    assert live.exists() and other_host.exists()


def test_sigterm_and_ctrl_c_stop_preparation_cleanly(tok, tmp_path):
    """SIGTERM and SIGINT during preparation: one line, exit 128 + signal, no temporary
    folder left behind."""
    src = tmp_path / "src"
    src.mkdir()
    body = "\n".join(_text(200, seed=j) for j in range(1500))
    for i in range(40):  # 12 MB: enough work that the signal lands mid-preparation
        (src / f"{i}.txt").write_text(f"file {i}\n{body}")
    domain = {"name": "big", "kind": "text_glob", "pattern": str(src / "*.txt")}
    config = _config(tmp_path, domain, tok)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH",
                                                                              "")]))
    procs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        data = tmp_path / f"data-{sig.name}"
        procs[sig] = (data, subprocess.Popen(
            [sys.executable, os.path.join(REPO, "scripts", "prepare_data.py"), "--config",
             config, f"--config.data.cache_dir={data}", "--no_progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    for sig, (data, proc) in procs.items():
        deadline = time.monotonic() + 120
        while not glob.glob(str(data / ".tmp-*")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(sig)
    for sig, (data, proc) in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, (out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stopped: ") and sig.name in lines[0]
        assert not [n for n in os.listdir(data) if n.startswith((".tmp", ".parts"))]

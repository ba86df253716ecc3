"""Tokenize + pack: no token lost, segment ids, splits, caching, atomicity, TFDS domains."""

import json
import os
import pickle
from collections import Counter

import numpy as np
import pytest

from cpt_jax.data import prepare, sources
from cpt_jax.data import tokenizer as tk
from cpt_jax.data.prepare import PackedRows, pack_documents
from tiny_runs import demo_tokenizer, load_script

SEQ_LEN = 16


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


def _docs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "x = 1", "\n", "déjà", "🦙"]
    return [" ".join(rng.choice(words, size=rng.integers(1, 30))) for _ in range(n)]


def _write_docs(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"{i:04d}.txt").write_text(doc)
    return {"name": "toy", "kind": "text_glob", "pattern": str(folder / "*.txt")}


def _unpack(tokens, segs):
    """Concatenation of all rows minus padding."""
    return tokens[segs > 0]


# ---------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("seq_len", [1, 3, 7, 16])
def test_pack_loses_and_duplicates_nothing(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(10, 100, size=rng.integers(0, 20)).tolist() for _ in range(30)]
    tokens, segs = pack_documents(docs, seq_len, bos_id=1, eos_id=2, pad_id=0)
    assert tokens.shape == segs.shape == (tokens.shape[0], seq_len + 1)
    assert tokens.dtype == segs.dtype == np.int32
    expected = np.concatenate([[1, *d, 2] for d in docs])
    np.testing.assert_array_equal(_unpack(tokens, segs), expected)
    # Padding only at the end of the last row.
    assert (segs[:-1] > 0).all()
    last = segs[-1]
    assert (last[: (last > 0).sum()] > 0).all() and (tokens[-1][last == 0] == 0).all()
    assert tokens.shape[0] == -(-len(expected) // (seq_len + 1))


def test_segment_ids_number_documents_within_each_row():
    tokens, segs = pack_documents([[5, 5, 5], [6], [7, 7, 7, 7, 7, 7]], seq_len=5,
                                  bos_id=1, eos_id=2, pad_id=0)
    np.testing.assert_array_equal(tokens, [[1, 5, 5, 5, 2, 1],
                                           [6, 2, 1, 7, 7, 7],
                                           [7, 7, 7, 2, 0, 0]])
    np.testing.assert_array_equal(segs, [[1, 1, 1, 1, 1, 2],
                                         [1, 1, 2, 2, 2, 2],
                                         [1, 1, 1, 1, 0, 0]])


def test_exact_fit_has_no_padding_row():
    tokens, segs = pack_documents([[5, 5]], seq_len=3, bos_id=1, eos_id=2)
    assert tokens.shape == (1, 4) and (segs == 1).all()


# ---------------------------------------------------------------------------------------
# prepare_domain


def _wrapped_documents(tokens, segs, bos, eos):
    """The complete [BOS] doc [EOS] token sequences of a split's rows, in row order."""
    docs, cur = [], None
    for t in _unpack(tokens, segs).tolist():
        if t == bos:
            assert cur is None, "a document starts inside another"
            cur = [t]
        else:
            assert cur is not None, "tokens outside [BOS] ... [EOS]"
            cur.append(t)
            if t == eos:
                docs.append(tuple(cur))
                cur = None
    assert cur is None, "the split ends inside a document"
    return docs


def test_prepare_roundtrip_and_split(tok, tmp_path):
    """Every document lands, whole and once, in exactly one split, identified by content
    (not by the code's split function); identical documents share a split."""
    docs = _docs(60)
    docs = docs + docs[:10]  # identical documents must never straddle the split
    domain = _write_docs(tmp_path / "src", docs)
    out = prepare.prepare_domain(domain, tok, str(tmp_path / "data"), SEQ_LEN,
                                 val_fraction=0.2, seed=3, progress=False)
    folder = os.path.dirname(out["train"].path)
    assert os.path.basename(folder).startswith("toy-") and len(os.path.basename(folder)) == 16
    assert sorted(os.listdir(folder)) == ["meta.json", "train-00000.array_record",
                                          "val-00000.array_record"]
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["seq_len"] == SEQ_LEN and meta["vocab_size"] == tok.vocab_size
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["n_documents"] == 70

    wrapped = [(tok.bos_id, *tok.encode(d), tok.eos_id) for d in docs]
    read = {}
    for split, rows in out.items():
        assert len(rows) == meta["splits"][split]["rows"] > 0
        tokens, segs = rows.read(np.arange(len(rows)))
        read[split] = (tokens, segs)
        # Random access with repeats, any order.
        t2, s2 = rows.read([len(rows) - 1, 0, 0])
        np.testing.assert_array_equal(t2, tokens[[-1, 0, 0]])
        np.testing.assert_array_equal(s2, segs[[-1, 0, 0]])
    found = {split: _wrapped_documents(*read[split], tok.bos_id, tok.eos_id)
             for split in read}
    # Both splits hold documents, and by content they are disjoint and cover all documents.
    assert found["train"] and found["val"]
    assert not set(found["train"]) & set(found["val"])
    assert Counter(found["train"]) + Counter(found["val"]) == Counter(wrapped)
    assert 0.05 < len(found["val"]) / len(wrapped) < 0.4  # about val_fraction = 0.2
    for split in read:
        # Within a split, the documents in source order and nothing else (no token lost).
        mine = set(found[split])
        expected = np.concatenate([w for w in wrapped if w in mine])
        np.testing.assert_array_equal(_unpack(*read[split]), expected)
        assert meta["splits"][split]["tokens"] == len(expected)
        assert meta["splits"][split]["docs"] == len(found[split])
    with pytest.raises(IndexError, match=r"\[0, "):
        out["train"].read([len(out["train"])])
    # PackedRows survives pickling (worker processes).
    clone = pickle.loads(pickle.dumps(out["val"]))
    np.testing.assert_array_equal(clone.read([0])[0], out["val"].read([0])[0])

    # Adding documents does not move the others between the splits.
    more = _write_docs(tmp_path / "src", docs + _docs(30, seed=7))
    grown = prepare.prepare_domain(more, tok, str(tmp_path / "data"), SEQ_LEN,
                                   val_fraction=0.2, seed=3, progress=False)
    grown_val = set(_wrapped_documents(*grown["val"].read(np.arange(len(grown["val"]))),
                                       tok.bos_id, tok.eos_id))
    assert {w for w in wrapped if w in grown_val} == set(found["val"])


def test_at_least_one_validation_row_when_possible(tok, tmp_path):
    docs = _docs(3, seed=1)
    domain = _write_docs(tmp_path / "src", docs)
    fraction = 1e-9  # no document would score below this
    assert all(prepare.split_score(d, 0) >= fraction for d in docs)
    out = prepare.prepare_domain(domain, tok, str(tmp_path / "data"), SEQ_LEN,
                                 val_fraction=fraction, progress=False)
    assert len(out["val"]) >= 1 and len(out["train"]) >= 1
    assert out["val"].meta["splits"]["val"]["docs"] == 1
    no_val = prepare.prepare_domain(domain, tok, str(tmp_path / "data"), SEQ_LEN,
                                    val_fraction=0.0, progress=False)
    assert len(no_val["val"]) == 0
    assert no_val["val"].read([])[0].shape == (0, SEQ_LEN + 1)


def test_prepare_is_skipped_the_second_time(tok, tmp_path, monkeypatch):
    domain = _write_docs(tmp_path / "src", _docs(10))
    data_dir = str(tmp_path / "data")
    first = prepare.prepare_domain(domain, tok, data_dir, SEQ_LEN, progress=False)
    meta_path = os.path.join(os.path.dirname(first["train"].path), "meta.json")
    mtime = os.stat(meta_path).st_mtime_ns

    calls = []
    real = sources.iter_long_documents
    monkeypatch.setattr(sources, "iter_long_documents",
                        lambda d: (calls.append(d), real(d))[1])
    again = prepare.prepare_domain(domain, tok, data_dir, SEQ_LEN, progress=False)
    assert calls == [] and os.stat(meta_path).st_mtime_ns == mtime
    assert again["train"].path == first["train"].path
    # A change of the source, seq_len or split makes a new folder.
    (tmp_path / "src" / "9999.txt").write_text("a new document")
    changed = prepare.prepare_domain(domain, tok, data_dir, SEQ_LEN, progress=False)
    assert calls and changed["train"].path != first["train"].path
    other = prepare.prepare_domain(domain, tok, data_dir, SEQ_LEN + 1, progress=False)
    assert other["train"].seq_len == SEQ_LEN + 1
    assert len(os.listdir(data_dir)) == 3
    # A tampered folder is reported, not silently overwritten.
    os.remove(os.path.join(os.path.dirname(other["train"].path), "meta.json"))
    with pytest.raises(prepare.PrepareError, match=r"exists but is not a complete"):
        prepare.prepare_domain(domain, tok, data_dir, SEQ_LEN + 1, progress=False)


def test_failure_mid_way_leaves_no_output(tok, tmp_path, monkeypatch):
    domain = _write_docs(tmp_path / "src", _docs(700))

    def broken(d):
        for i, doc in enumerate(sources.REGISTRY["text_glob"].documents(sources.normalize_domain(d))):
            if i == 600:  # after some rows were written
                raise OSError("disk on fire")
            yield iter((doc,))

    monkeypatch.setattr(sources, "iter_long_documents", broken)
    data_dir = tmp_path / "data"
    with pytest.raises(OSError, match="disk on fire"):
        prepare.prepare_domain(domain, tok, str(data_dir), SEQ_LEN, progress=False)
    assert os.listdir(data_dir) == []


def test_prepare_domains_and_errors(tok, tmp_path):
    a = _write_docs(tmp_path / "a", _docs(5, 1))
    b = dict(_write_docs(tmp_path / "b", _docs(5, 2)), name="other")
    out = prepare.prepare_domains([a, b], tok, str(tmp_path / "data"), SEQ_LEN,
                                  progress=False)
    assert list(out) == ["toy", "other"]
    assert all(isinstance(v, PackedRows) for s in out.values() for v in s.values())
    with pytest.raises(prepare.PrepareError, match=r"\['toy'\] appear twice"):
        prepare.prepare_domains([a, a], tok, str(tmp_path / "data"), SEQ_LEN)
    empty = _write_docs(tmp_path / "e", ["", ""])
    with pytest.raises(prepare.PrepareError, match=r"'toy' has no non-empty document"):
        prepare.prepare_domain(empty, tok, str(tmp_path / "data2"), SEQ_LEN,
                               progress=False)
    assert not [f for f in os.listdir(tmp_path / "data2")]
    with pytest.raises(prepare.PrepareError, match=r"val_fraction must be in"):
        prepare.prepare_domain(a, tok, str(tmp_path / "data"), SEQ_LEN, val_fraction=1.0)
    with pytest.raises(prepare.PrepareError, match=r"do not exist"):
        PackedRows(str(tmp_path / "nope" / "train.array_record"))


def test_tokenizer_without_pad_id_pads_with_zero(tmp_path):
    """Llama-2 style models (unk=0, bos=1, eos=2, no pad) load and pack."""
    import io

    import sentencepiece as spm
    text = _docs(400)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=proto,
                                   vocab_size=280, byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(proto.getvalue())
    llama_like = tk.load_tokenizer(str(tmp_path))
    assert (llama_like.unk_id, llama_like.bos_id, llama_like.eos_id,
            llama_like.pad_id) == (0, 1, 2, -1)
    domain = _write_docs(tmp_path / "src", ["abc"])
    out = prepare.prepare_domain(domain, llama_like, str(tmp_path / "data"), SEQ_LEN,
                                 val_fraction=0.0, progress=False)
    tokens, segs = out["train"].read([0])
    assert (tokens[segs == 0] == 0).all() and out["train"].meta["pad_id"] == 0


# ---------------------------------------------------------------------------------------
# Determinism and the CLI


def test_preparation_is_deterministic(tok, tmp_path):
    domain = _write_docs(tmp_path / "src", _docs(50))
    a = prepare.prepare_domain(domain, tok, str(tmp_path / "a"), SEQ_LEN, progress=False)
    b = prepare.prepare_domain(domain, tok, str(tmp_path / "b"), SEQ_LEN, progress=False)
    for split in ("train", "val"):
        assert [open(f, "rb").read() for f in a[split].files] == \
            [open(f, "rb").read() for f in b[split].files]
    assert a["train"].meta["content_sha256"] == b["train"].meta["content_sha256"]


def test_prepare_data_script(tmp_path, capsys):
    """scripts/prepare_data.py prepares a run config's data where the run looks for it."""
    script = load_script("prepare_data")
    src = _write_docs(tmp_path / "src", _docs(20))
    demos = [{"name": n, "kind": "demo", "demo": n, "max_chars": 15000}
             for n in ("python_docs", "python_code", "unicode_table")]
    config = tmp_path / "cfg.py"
    config.write_text(
        "from cpt_jax.run_config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.model.vocab_size, c.seq_len = 400, 32\n"
        f"    c.data.domains = {[src] + demos!r}\n"
        "    return c\n")
    summary = script.main(["--config", str(config), "--workdir", str(tmp_path / "run"),
                           "--no_progress"])
    assert list(summary) == ["toy", "python_docs", "python_code", "unicode_table"]
    assert all(v["train_rows"] > 0 and v["val_rows"] > 0 for v in summary.values())
    # where a run of this config with --workdir run looks for its data and tokenizer
    assert os.path.isfile(tmp_path / "run" / "data" / "tokenizer-bpe-400.model")
    assert all(v["dir"].startswith(str(tmp_path / "run" / "data")) for v in summary.values())
    assert '"domain": "unicode_table"' in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"--workdir"):
        script.main(["--config", str(config)])


# ---------------------------------------------------------------------------------------
# Damaged caches: detected with an error naming the file and the folder to delete


def _prepared(tok, tmp_path, n_docs=30):
    """A tiny prepared domain: (domain, data_dir, folder, {split: original file bytes})."""
    domain = _write_docs(tmp_path / "src", _docs(n_docs))
    data_dir = str(tmp_path / "data")
    out = prepare.prepare_domain(domain, tok, data_dir, SEQ_LEN, val_fraction=0.2,
                                 progress=False)
    folder = os.path.dirname(out["train"].path)
    files = {s: open(out[s].files[0], "rb").read() for s in ("train", "val")}
    assert all(len(rows) > 0 for rows in out.values())
    return domain, data_dir, folder, files


def _assert_names_fix(excinfo, path, folder):
    msg = str(excinfo.value)
    assert path in msg and f"Delete the folder {folder}" in msg and "rm -r" in msg, msg


def _reprepare_after_delete(domain, tok, data_dir, folder, files):
    """Deleting the folder (the fix the error names) re-prepares the same bytes."""
    import shutil
    shutil.rmtree(folder)
    out = prepare.prepare_domain(domain, tok, data_dir, SEQ_LEN, val_fraction=0.2,
                                 progress=False, verify_sha256=True)
    assert os.path.dirname(out["train"].path) == folder
    assert os.listdir(data_dir) == [os.path.basename(folder)]  # no temp folders left
    for split, original in files.items():
        assert open(out[split].files[0], "rb").read() == original
        tokens, segs = out[split].read(np.arange(len(out[split])))
        assert tokens.shape == (len(out[split]), SEQ_LEN + 1)


def test_meta_records_file_sizes_and_hashes(tok, tmp_path):
    import hashlib
    _, _, folder, files = _prepared(tok, tmp_path)
    meta = json.load(open(os.path.join(folder, "meta.json")))
    for split, data in files.items():
        assert meta["files"][f"{split}-00000.array_record"] == {
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_truncated_file_is_reported_at_open(tok, tmp_path):
    domain, data_dir, folder, files = _prepared(tok, tmp_path)
    path = os.path.join(folder, "train-00000.array_record")
    opened = PackedRows(path)
    opened.read([0])  # array_record reader open before the damage
    os.truncate(path, len(files["train"]) // 2)
    with pytest.raises(prepare.CorruptDataError, match=r"bytes but was written with") as e:
        prepare.prepare_domain(domain, tok, data_dir, SEQ_LEN, val_fraction=0.2,
                               progress=False)
    _assert_names_fix(e, path, folder)
    with pytest.raises(prepare.CorruptDataError, match=r"truncated"):
        PackedRows(path)
    # Cut inside the rows: a reader opened before then gets empty records from
    # array_record (its index is in memory), which read() reports.
    os.truncate(path, 4096)
    with pytest.raises(prepare.CorruptDataError, match=r"did it change while open") as e:
        opened.read(np.arange(len(opened)))
    _assert_names_fix(e, path, folder)
    _reprepare_after_delete(domain, tok, data_dir, folder, files)


def test_truncated_file_in_folder_without_recorded_sizes(tok, tmp_path):
    """Folders prepared before sizes were recorded: caught when array_record opens it."""
    domain, data_dir, folder, files = _prepared(tok, tmp_path)
    meta_path = os.path.join(folder, "meta.json")
    meta = json.load(open(meta_path))
    del meta["files"]
    json.dump(meta, open(meta_path, "w"))
    path = os.path.join(folder, "val-00000.array_record")
    os.truncate(path, len(files["val"]) // 2)
    out = prepare.prepare_domain(domain, tok, data_dir, SEQ_LEN, val_fraction=0.2,
                                 progress=False)  # same key: the folder is reused
    with pytest.raises(prepare.CorruptDataError, match=r"cannot be opened by array_record"
                       ) as e:
        out["val"].read([0])
    _assert_names_fix(e, path, folder)


def test_overwritten_bytes_never_come_back_as_rows(tok, tmp_path):
    """Same-length corruption anywhere: verify_sha256 reports it when the folder is opened;
    without it, array_record's chunk checksums fail the read and we say which folder to
    delete, or the bytes were unused (block padding) and the rows come back intact."""
    import shutil
    domain, data_dir, folder, files = _prepared(tok, tmp_path)
    path = os.path.join(folder, "train-00000.array_record")
    original = files["train"]
    backup = str(tmp_path / "train.bak")
    shutil.copy(path, backup)
    rows = PackedRows(path)
    want = rows.read(np.arange(len(rows)))
    offsets = sorted({*range(0, len(original) - 64, 2048), 1024, len(original) // 2})
    caught = []
    for offset in offsets:
        shutil.copy(backup, path)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(bytes(b ^ 0xA5 for b in original[offset:offset + 64]))
        assert os.path.getsize(path) == len(original)
        with pytest.raises(prepare.CorruptDataError, match=r"sha256 .* but was written") as e:
            prepare.prepare_domain(domain, tok, data_dir, SEQ_LEN, val_fraction=0.2,
                                   progress=False, verify_sha256=True)
        _assert_names_fix(e, path, folder)
        fresh = PackedRows(path)  # the size matches: opening without the hash succeeds
        try:
            got = fresh.read(np.arange(len(fresh)))
        except prepare.CorruptDataError as err:
            assert path in str(err) and "rm -r" in str(err)
            caught.append(offset)
            continue
        np.testing.assert_array_equal(got[0], want[0])  # never garbage
        np.testing.assert_array_equal(got[1], want[1])
    # Row data (at 1 KiB) and the middle of the file (array_record's index) are checked.
    assert 1024 in caught and len(original) // 2 in caught, caught
    shutil.copy(backup, path)
    _reprepare_after_delete(domain, tok, data_dir, folder, files)


def test_deleted_file_in_complete_folder(tok, tmp_path):
    domain, data_dir, folder, files = _prepared(tok, tmp_path)
    path = os.path.join(folder, "val-00000.array_record")
    os.remove(path)
    with pytest.raises(prepare.CorruptDataError, match=r"is missing, though .*meta.json "
                                                        r"marks the folder") as e:
        prepare.prepare_domain(domain, tok, data_dir, SEQ_LEN, val_fraction=0.2,
                               progress=False)
    _assert_names_fix(e, path, folder)
    _reprepare_after_delete(domain, tok, data_dir, folder, files)


def test_unreadable_meta_json(tok, tmp_path):
    domain, data_dir, folder, files = _prepared(tok, tmp_path)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        f.write('{"key": "trunc')
    with pytest.raises(prepare.PrepareError, match=r"exists but is not a complete"):
        prepare.prepare_domain(domain, tok, data_dir, SEQ_LEN, val_fraction=0.2,
                               progress=False)
    path = os.path.join(folder, "train-00000.array_record")
    with pytest.raises(prepare.CorruptDataError, match=r"no readable description") as e:
        PackedRows(path)
    _assert_names_fix(e, path, folder)
    _reprepare_after_delete(domain, tok, data_dir, folder, files)


def test_max_tokens_caps_what_is_prepared(tok, tmp_path):
    """A token cap stops preparation at the first document that reaches it; the capped
    domain is its own folder."""
    docs = _docs(n=600, seed=3)
    domain = _write_docs(tmp_path / "src", docs)
    full = prepare.prepare_domain(domain, tok, str(tmp_path / "out"), SEQ_LEN, 0.1,
                                  progress=False)["train"].meta
    capped = prepare.prepare_domain(dict(domain, max_tokens=1000), tok, str(tmp_path / "out"),
                                    SEQ_LEN, 0.1, progress=False)["train"].meta
    longest = max(len(ids) for ids in tok.encode_batch(docs)) + 2  # with BOS and EOS
    assert full["n_documents"] == 600 and capped["n_documents"] < 600
    assert 1000 <= capped["n_tokens"] < 1000 + longest
    with pytest.raises(sources.DomainError, match="max_tokens must be a positive int"):
        sources.normalize_domain(dict(domain, max_tokens=0))

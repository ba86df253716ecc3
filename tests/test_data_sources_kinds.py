"""Source kinds on files each test writes with the format's own writer (pyarrow for
Parquet and Arrow, zstandard, gzip, ``datasets.save_to_disk``): the documents expected
are the ones handed to the writer. Binary input through a text kind is refused."""

import gzip
import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpt_jax.data import sources
from cpt_jax.data.sources import DomainError

DOCS = [f"document {i}: " + "word " * (i % 7) + ("é" if i % 3 else "") for i in range(23)]


def write_parquet_shards(folder, docs, shards=2, row_group_size=4):
    """Shards of a Parquet dataset, each with several row groups; returns their paths."""
    per = -(-len(docs) // shards)
    paths = []
    for s in range(shards):
        part = docs[s * per:(s + 1) * per]
        table = pa.table({"id": list(range(len(part))), "content": part})
        path = folder / f"part-{s:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def test_parquet_streams_row_groups_of_every_shard_in_order(tmp_path):
    paths = write_parquet_shards(tmp_path, DOCS)
    assert all(pq.ParquetFile(p).num_row_groups >= 3 for p in paths)
    domain = {"name": "pq", "kind": "parquet", "pattern": str(tmp_path / "*.parquet"),
              "field": "content"}
    assert list(sources.iter_documents(domain)) == DOCS
    assert list(sources.iter_documents(dict(domain, max_docs=5))) == DOCS[:5]
    assert [tuple(f) for f in sources.source_fingerprint(domain)["files"]] == [  # content
        (os.path.getsize(p), hashlib.sha256(open(p, "rb").read()).hexdigest())
        for p in paths]
    with pytest.raises(DomainError, match=r"no column 'text' \(columns: \['id', 'content'\]\)"
                       r".*\"field\""):
        sources.validate_domain(dict(domain, field="text"))
    with pytest.raises(DomainError, match=r"column 'id' .* not text"):
        list(sources.iter_documents(dict(domain, field="id")))


def test_jsonl_zst_and_gz_are_streamed(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    lines = "".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(DOCS[:12]))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in DOCS[12:]:
            f.write(json.dumps({"text": d}) + "\n")
    domain = {"name": "j", "kind": "jsonl", "pattern": [str(tmp_path / "*.zst"),
                                                       str(tmp_path / "*.gz")]}
    assert list(sources.iter_documents(domain)) == DOCS


def test_text_glob_decompresses_gz_and_zst_files(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(DOCS[0].encode()))
    (tmp_path / "b.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(DOCS[1].encode()))
    (tmp_path / "c.txt").write_text(DOCS[2], encoding="utf-8")
    domain = {"name": "t", "kind": "text_glob", "pattern": str(tmp_path / "*")}
    assert list(sources.iter_documents(domain)) == DOCS[:3]


def test_hf_dataset_reads_save_to_disk_without_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
    ds.save_to_disk(str(tmp_path / "one"), num_shards=3)
    domain = {"name": "hf", "kind": "hf_dataset", "path": str(tmp_path / "one")}
    assert list(sources.iter_documents(domain)) == DOCS
    assert len(sources.list_files(domain)) == 3

    dd = datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))})
    dd.save_to_disk(str(tmp_path / "dict"))
    split = {"name": "hf", "kind": "hf_dataset", "path": str(tmp_path / "dict")}
    with pytest.raises(DomainError, match=r"DatasetDict and needs \"split\".*'train'"):
        sources.validate_domain(split)
    assert list(sources.iter_documents(dict(split, split="validation"))) == DOCS[:3]
    with pytest.raises(DomainError, match=r"no column 'body'.*\"field\""):
        sources.validate_domain(dict(domain, field="body"))
    with pytest.raises(DomainError, match=r"holds one dataset, not a DatasetDict.*\"split\""):
        sources.validate_domain(dict(domain, split="train"))


def test_hf_dataset_reads_arrow_files_of_both_ipc_formats(tmp_path):
    table = pa.table({"text": DOCS})
    with pa.OSFile(str(tmp_path / "a.arrow"), "wb") as sink:  # stream format
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(0, 10), max_chunksize=4)
    with pa.OSFile(str(tmp_path / "b.arrow"), "wb") as sink:  # file format
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table.slice(10), max_chunksize=4)
    domain = {"name": "arrow", "kind": "hf_dataset", "path": str(tmp_path / "*.arrow")}
    assert list(sources.iter_documents(domain)) == DOCS


@pytest.mark.parametrize("kind", ["text_glob", "jsonl"])
def test_binary_files_through_a_text_kind_are_refused_naming_the_kind(tmp_path, kind):
    write_parquet_shards(tmp_path, DOCS, shards=1)
    domain = {"name": "t", "kind": kind, "pattern": str(tmp_path / "*.parquet"),
              "encoding_errors": "replace"}  # the old advice must not let bytes through
    with pytest.raises(DomainError, match=r"is a Parquet file, not text; use kind 'parquet'"):
        sources.validate_domain(domain)
    (tmp_path / "x.bin").write_bytes(b"abc\x00\x01\x02" * 10)
    with pytest.raises(DomainError, match=r"NUL bytes.*binary"):
        sources.validate_domain(dict(domain, pattern=str(tmp_path / "x.bin")))
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "y.jsonl").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n'))
    with pytest.raises(DomainError, match=r"zstd-compressed without a .zst suffix.*\*.zst"):
        sources.validate_domain(dict(domain, pattern=str(tmp_path / "y.jsonl")))


def test_every_kind_is_one_registry_entry():
    assert set(sources.KINDS) == {"text_glob", "jsonl", "parquet", "hf_dataset", "tfds",
                                  "demo"}
    for name, kind in sources.REGISTRY.items():
        assert kind.name == name and isinstance(kind, sources.SourceKind)


def test_source_kinds_benchmark_reads_back_what_it_wrote(tmp_path, capsys):
    """scripts/source_kinds_benchmark.py on a small corpus: every kind yields the documents
    written (the script checks it) and prepares the same rows."""
    from tiny_runs import load_script  # pylint: disable=import-outside-toplevel
    assert load_script("source_kinds_benchmark").main(
        ["--docs", "400", "--dir", str(tmp_path / "kinds")]) == 0
    rows = [line.split("|")[-2].strip() for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "MB" in line]
    assert len(rows) >= 5 and len(set(rows)) == 1

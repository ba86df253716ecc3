"""Read and prepare cost of every file source kind on one synthetic corpus.

    python scripts/source_kinds_benchmark.py --docs 20000 --dir /tmp/kinds

Writes the same documents as text files, JSON lines (plain, .gz, .zst), two Parquet shards
(row groups of 1,000 rows) and a ``datasets.save_to_disk`` folder (when ``datasets`` is
installed), trains one small tokenizer, then for each kind times reading every document
(``iter_documents``) and preparing the domain (tokenize and pack, ``prepare_domain``,
seq_len 256, val_fraction 0.05). Prints a Markdown table: source bytes, seconds, prepared
bytes and rows. Every kind must yield the documents written, in order.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import time

from cpt_jax.data import prepare, sources
from cpt_jax.data import tokenizer as tokenizer_lib

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his "
         "from at which").split()


def _size(paths) -> int:
    total = 0
    for p in paths:
        if os.path.isdir(p):
            total += sum(os.path.getsize(os.path.join(a, f)) for a, _, fs in os.walk(p)
                         for f in fs)
        else:
            total += os.path.getsize(p)
    return total


def write_corpus(root: str, docs: list[str]) -> dict:
    """The corpus in every format -> {label: (domain spec, paths written)}."""
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    import zstandard  # pylint: disable=import-outside-toplevel

    os.makedirs(f"{root}/txt")
    for i, d in enumerate(docs):
        with open(f"{root}/txt/{i:06d}.txt", "w", encoding="utf-8") as f:
            f.write(d)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    for name, data in (("c.jsonl", lines), ("c.jsonl.gz", gzip.compress(lines)),
                       ("c.jsonl.zst", zstandard.ZstdCompressor().compress(lines))):
        with open(f"{root}/{name}", "wb") as f:
            f.write(data)
    half = len(docs) // 2
    for s, part in enumerate((docs[:half], docs[half:])):
        pq.write_table(pa.table({"text": part}), f"{root}/p-{s}.parquet", row_group_size=1000)
    kinds = {
        "text_glob": ({"kind": "text_glob", "pattern": f"{root}/txt/*.txt"}, [f"{root}/txt"]),
        "jsonl": ({"kind": "jsonl", "pattern": f"{root}/c.jsonl"}, [f"{root}/c.jsonl"]),
        "jsonl.gz": ({"kind": "jsonl", "pattern": f"{root}/c.jsonl.gz"},
                     [f"{root}/c.jsonl.gz"]),
        "jsonl.zst": ({"kind": "jsonl", "pattern": f"{root}/c.jsonl.zst"},
                      [f"{root}/c.jsonl.zst"]),
        "parquet": ({"kind": "parquet", "pattern": f"{root}/p-*.parquet"},
                    [f"{root}/p-0.parquet", f"{root}/p-1.parquet"]),
    }
    try:
        import datasets  # pylint: disable=import-outside-toplevel
        datasets.disable_progress_bars()
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(f"{root}/hf", num_shards=2)
        kinds["hf_dataset"] = ({"kind": "hf_dataset", "path": f"{root}/hf"}, [f"{root}/hf"])
    except ImportError:
        print("datasets is not installed: no hf_dataset row")
    return kinds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=20_000, help="documents in the corpus")
    parser.add_argument("--dir", required=True, help="scratch folder (emptied first)")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(80, 220))) + "."
            for _ in range(args.docs)]
    kinds = write_corpus(root, docs)
    tok = tokenizer_lib.train_tokenizer([{"name": "corpus", **kinds["jsonl"][0]}],
                                        f"{root}/tok", 340, sample_chars=300_000)
    print(f"{len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} M characters")
    print("| kind | source | read s | prepare s | prepared | rows (train+val) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, (spec, paths) in kinds.items():
        d = {"name": label.replace(".", "_"), **spec}
        t0 = time.perf_counter()
        read = list(sources.iter_documents(d))
        t_read = time.perf_counter() - t0
        if read != docs:
            raise SystemExit(f"{label}: the documents read differ from those written")
        t0 = time.perf_counter()
        out = prepare.prepare_domain(d, tok, f"{root}/prepared", 256, 0.05, progress=False)
        t_prep = time.perf_counter() - t0
        folder = os.path.dirname(out["train"].path)
        print(f"| {label} | {_size(paths) / 1e6:.2f} MB | {t_read:.3f} | {t_prep:.2f} | "
              f"{_size([folder]) / 1e6:.2f} MB | {len(out['train'])}+{len(out['val'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

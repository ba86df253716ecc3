"""How fast data preparation runs, and in how much memory (``scripts/benchmark.py
--prepare``).

``prepare_speed``: a JSONL corpus of about ``chars`` characters is built from the config's
domains (their documents, repeated until the size is reached), then on the same documents
it times (a) the bare tokenizer, one thread: ``encode_batch`` of 256-document batches, the
call preparation makes, and nothing else (before and after the preparations; the faster
counts, so a busy machine does not flatter the ratios); (b) ``prepare_domain`` with 1 worker and with
``workers`` workers, each into a fresh folder (reading, splitting, hashing, packing,
writing and the workers' start included). The issue's targets: one worker >= 0.7 of the
bare encode, N workers >= 0.8 N x one worker on N free cores.

``prepare_memory``: the peak resident memory of a child process preparing one text file
of ``mb`` megabytes as a single-document ``text_glob`` domain with one worker (the
parent's own memory is not counted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from cpt_jax.data import prepare, sources


def _corpus(domains, folder: str, chars: int) -> tuple[str, list[str]]:
    """Writes ``folder/corpus.jsonl`` of about ``chars`` characters; returns its path and
    the documents."""
    base = [doc for d in domains for doc in sources.iter_documents(d) if doc]
    if not base:
        raise prepare.PrepareError("the config's domains hold no text to benchmark with")
    docs, total = [], 0
    while total < chars:
        for doc in base:
            docs.append(doc)
            total += len(doc)
            if total >= chars:
                break
    path = os.path.join(folder, "corpus.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return path, docs


def bare_encode_tokens_per_s(tok, docs: list[str]) -> tuple[float, int]:
    """(tokens/s, tokens) of the tokenizer alone on one thread, in preparation's batches."""
    kwargs = {"num_threads": 1} if getattr(tok, "kind", "") == "sentencepiece" else {}
    start, n = time.perf_counter(), 0
    for i in range(0, len(docs), 256):
        n += sum(len(ids) for ids in tok.encode_batch(docs[i:i + 256], **kwargs))
    return n / (time.perf_counter() - start), n


def prepare_speed(config, tok, folder: str, chars: int, workers: int) -> dict:
    """tokens/s of the bare encode and of preparation with 1 and ``workers`` workers."""
    domains = [dict(d) for d in config.data.domains]
    path, docs = _corpus(domains, folder, chars)
    domain = {"name": "bench", "kind": "jsonl", "pattern": path}
    bare, n_tokens = bare_encode_tokens_per_s(tok, docs)
    out = {"chars": sum(map(len, docs)), "documents": len(docs), "tokens": n_tokens,
           "bare_encode_tokens_per_s": bare, "workers": workers, "cores": os.cpu_count()}
    for n in sorted({1, workers}):
        data_dir = os.path.join(folder, f"data-{n}")
        start = time.perf_counter()
        rows = prepare.prepare_domain(domain, tok, data_dir, config.seq_len,
                                      config.data.val_fraction, progress=False, workers=n)
        seconds = time.perf_counter() - start
        tokens = rows["train"].meta["n_tokens"]
        out[f"prepare_{n}_seconds"] = seconds
        out[f"prepare_{n}_tokens_per_s"] = tokens / seconds
    # The bare encode again: on a shared machine the faster of the two is the fair bound.
    bare = max(bare, bare_encode_tokens_per_s(tok, docs)[0])
    out["bare_encode_tokens_per_s"] = bare
    one = out["prepare_1_tokens_per_s"]
    many = out[f"prepare_{workers}_tokens_per_s"]
    out["one_worker_over_bare"] = one / bare
    out["n_workers_over_n_x_one"] = many / (workers * one)
    out["hours_per_100B_tokens_per_host"] = 1e11 / many / 3600
    return out


_CHILD = """
import json, os, resource, sys, time
from cpt_jax.data import prepare, tokenizer
tok = tokenizer.load_tokenizer(sys.argv[1])
domain = {"name": "onefile", "kind": "text_glob", "pattern": sys.argv[2]}
import inspect
kwargs = ({"workers": 1} if "workers" in inspect.signature(prepare.prepare_domain).parameters
          else {})  # code from before workers existed (a "before" measurement)
start = time.perf_counter()
out = prepare.prepare_domain(domain, tok, sys.argv[3], int(sys.argv[4]), 0.01,
                             progress=False, **kwargs)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "tokens": out["train"].meta["n_tokens"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def prepare_memory(config, tok, folder: str, mb: float, python_path: str | None = None
                   ) -> dict:
    """Peak RSS of a child process preparing one ``mb`` MB text file (a single document)
    with one worker. ``python_path``: the code to measure (default: this one)."""
    domains = [dict(d) for d in config.data.domains]
    text = "\n\n".join(doc for d in domains for doc in sources.iter_documents(d) if doc)
    path = os.path.join(folder, "one_file.txt")
    target = int(mb * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < target:
            piece = text[:target - written]
            f.write(piece + "\n\n")
            written += len(piece.encode("utf-8")) + 2
    tok_path = tok.path
    env = dict(os.environ)
    if python_path:
        env["PYTHONPATH"] = python_path
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, tok_path, path, os.path.join(folder, "mem-data"),
         str(config.seq_len)], env=env, capture_output=True, text=True, check=False,
        cwd=folder)  # not the caller's folder: ``-c`` imports from the working directory
    if result.returncode:
        raise RuntimeError(f"the memory run failed: {result.stderr[-2000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["file_mb"] = os.path.getsize(path) / 1e6
    return out


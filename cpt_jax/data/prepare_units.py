"""Units: reading, splitting, packing and writing one domain's documents, and assembling
the units into the domain's folder.

The documents, in source order, are cut into units by the data alone (a unit ends at the
first document boundary past ``shard_chars`` characters or ``shard_docs`` documents:
``prepare.SHARD_CHARS`` and ``SHARD_DOCS``, passed down in ``Job``). A ``Job`` reads the
domain, tokenizes (``tokenizing``) and writes the units it owns, each into its own folder
(``Unit``: one ``SplitWriter`` per split, its last row of each split padded), so the
files do not depend on how many processes or hosts made them; ``assemble`` turns a
staging folder of complete units into the domain's folder with its meta.json
(``cpt_jax.data.prepare`` describes the layout).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np

from cpt_jax.data import sources
from cpt_jax.data.packed_rows import (FORMAT_VERSION, SPLITS, SplitWriter, file_integrity,
                                      is_complete)
from cpt_jax.data.prepare_errors import PrepareError
from cpt_jax.data.prepare_progress import Progress
from cpt_jax.data.stop_signals import check_stopped
from cpt_jax.data.temp_folders import writer_tag
from cpt_jax.data.tokenizing import Tokenizing

_BATCH_DOCS, _BATCH_CHARS = 256, 1_000_000  # one tokenization job
_SPILL_BLOCK = 1 << 22  # bytes of a long document's spilled ids read back at a time


def unit_name(u: int) -> str:
    return f"unit-{u:05d}"



class Unit:
    """One unit being written into ``<staging>/unit-NNNNN.tmp@host@pid@x/``, renamed to
    ``unit-NNNNN`` when complete (with its unit.json)."""

    def __init__(self, job: "Job", staging: str, u: int, force_score, tail_split):
        self.job, self.u = job, u
        self.final = os.path.join(staging, unit_name(u))
        self.tmp = f"{self.final}.tmp{writer_tag()}"
        os.makedirs(self.tmp)
        row_len = job.seq_len + 1
        self.writers = {s: SplitWriter(os.path.join(self.tmp, f"{s}.array_record"),
                                        row_len, job.pad_id) for s in SPLITS}
        self.force_score, self.tail_split = force_score, tail_split
        self.min_score = 2.0
        self.content = hashlib.sha256()
        self.spill = None  # tokens of a document read in parts, until its split is known
        self.spill_chars = 0

    def tokens(self) -> int:
        return sum(w.stats["tokens"] for w in self.writers.values())

    def part(self, ids: np.ndarray, n_chars: int, first: bool, last: bool,
             score: float | None, digest: bytes | None) -> None:
        """One part of a document (a whole document when ``first and last``)."""
        if first and last:
            self._route(score, digest, [ids], len(ids), n_chars)
            return
        if first:
            self.spill = tempfile.TemporaryFile(dir=self.tmp)
            self.spill_chars = 0
        self.spill.write(ids.astype(np.int32).tobytes())
        self.spill_chars += n_chars
        if last:
            n_tokens = self.spill.tell() // 4
            self.spill.seek(0)
            blocks = iter(lambda: self.spill.read(_SPILL_BLOCK), b"")
            self._route(score, digest, (np.frombuffer(b, np.int32) for b in blocks),
                        n_tokens, self.spill_chars)
            self.spill.close()
            self.spill = None

    def _route(self, score: float, digest: bytes, blocks, n_tokens: int,
               n_chars: int) -> None:
        """Writes one document's ids (in blocks) into its split."""
        job = self.job
        self.content.update(digest)
        is_val = score < job.val_fraction or score == self.force_score
        if not is_val:
            self.min_score = min(self.min_score, score)
        if job.val_only and not self.tail_split and not is_val:
            for _ in blocks:  # a held-out domain's train documents are not written
                pass
            return
        if self.tail_split:  # the domain's one document: its last tokens validate
            cut = n_tokens - max(1, int(n_tokens * job.val_fraction))
            train, val = self.writers["train"], self.writers["val"]
            train.add(np.asarray([job.bos_id], np.int32), n_chars)
            at, started = 0, False
            for block in blocks:
                head = max(0, min(len(block), cut - at))
                if head:
                    train.add(block[:head], 0, continues=True)
                if head < len(block):
                    val.add(block[head:], 0, continues=started)
                    started = True
                at += len(block)
            val.add(np.asarray([job.eos_id], np.int32), 0, continues=started)
            return
        w = self.writers["val" if is_val else "train"]
        w.add(np.asarray([job.bos_id], np.int32), n_chars)
        for block in blocks:
            w.add(block, 0, continues=True)
        w.add(np.asarray([job.eos_id], np.int32), 0, continues=True)

    def close(self, reader: dict) -> dict:
        stats = {s: w.close() for s, w in self.writers.items()}
        info = {"unit": self.u, "splits": stats, "n_documents": reader["docs"],
                "n_empty_documents": reader["empty"], "chars": reader["chars"],
                "content_sha256": self.content.hexdigest(),
                "min_train_score": self.min_score, "tail_split": self.tail_split,
                "force_score": self.force_score}
        with open(os.path.join(self.tmp, "unit.json"), "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
        if os.path.isdir(self.final):  # another process wrote the same unit: identical
            shutil.rmtree(self.final)
        os.rename(self.tmp, self.final)
        return info

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        if self.spill is not None:
            self.spill.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Job:
    """The preparation of one domain: reads its documents, cuts them into units, and
    tokenizes, splits, packs and writes the units it owns. ``shard_chars``,
    ``shard_docs`` (the unit size) and ``pool_min_chars`` (``Tokenizing``) are the
    settings of ``cpt_jax.data.prepare``, read there when the job is made."""

    def __init__(self, d, tok, seq_len, val_fraction, seed, val_only, workers, progress, *,
                 shard_chars: int, shard_docs: int, pool_min_chars: int):
        self.d, self.tok = d, tok
        self.seq_len, self.val_fraction, self.seed = seq_len, val_fraction, seed
        self.val_only, self.workers, self.progress = val_only, workers, progress
        self.shard_chars, self.shard_docs = shard_chars, shard_docs
        self.pool_min_chars = pool_min_chars
        self.pad_id = tok.pad_id if tok.pad_id >= 0 else 0
        self.bos_id, self.eos_id = tok.bos_id, tok.eos_id
        self.cap = d.get("max_tokens") or 0  # stop once the splits hold this many tokens
        self.capped = False

    def run(self, staging: str, shard: tuple[int, int], only: dict | None = None) -> None:
        """Writes the units this process owns: ``u % n == i`` (a capped domain: all of
        them on shard 0, since the cap counts tokens in source order), or those in
        ``only`` ({unit: (force_score, tail_split)}, the rebuilds of ``assemble``); then
        a ``shard-i-of-n.json`` marker with the number of units."""
        os.makedirs(staging, exist_ok=True)
        i, n = shard

        def owns(u):
            if only is not None:
                return u in only
            if not ((i == 0) if self.cap else (u % n == i)):
                return False
            # written before (an interrupted run): reused
            return not os.path.isfile(os.path.join(staging, unit_name(u), "unit.json"))

        if only is None and self._one_document():
            # A single text file is the domain's one document: its tail validates (known
            # now, so it is tokenized once and streamed, never held whole).
            only_tail = {0: (None, True)}
        else:
            only_tail = {}
        tokenizing = Tokenizing(self.tok, 1 if self.cap else self.workers,
                                self.pool_min_chars)
        bar = Progress(self.d, self.progress)
        units: dict[int, Unit] = {}
        ok = False
        try:
            n_units = self._stream(staging, owns, only or only_tail, tokenizing, units,
                                   bar)
            ok = True
        finally:
            tokenizing.close(ok)
            if not ok:
                for unit in units.values():
                    unit.abort()
            bar.close()
        if only is None:
            with open(os.path.join(staging, f"shard-{i}-of-{n}.json"), "w") as f:
                json.dump({"units": n_units}, f)

    def _one_document(self) -> bool:
        d = self.d
        if d["kind"] != "text_glob" or self.val_fraction <= 0:
            return False
        try:
            return len(sources.list_files(d)) == 1
        except sources.DomainError:
            return False

    def _jobs(self, owns, only: dict) -> Iterator[dict]:
        """Tokenization jobs in source order: texts to encode, and the events (document
        parts, unit ends) that their ids complete."""
        seed_prefix = f"{int(self.seed)}\0".encode()
        u, reader = 0, {"docs": 0, "empty": 0, "chars": 0}
        mine = owns(u)
        job = {"texts": [], "conts": [], "events": []}
        size = 0
        max_docs = 1 if self.cap else _BATCH_DOCS  # a cap stops reading at its document
        for parts in sources.iter_long_documents(self.d):
            if self.capped:
                break
            score_h, content_h = hashlib.sha256(seed_prefix), hashlib.sha256()
            n_chars = n_bytes = 0
            first = True
            ctx = ""  # "" for the first part, else the character before the part sent
            pending = None  # the previous part: sent once we know it is not the last
            for part in parts:
                raw = part.encode("utf-8", "replace")
                score_h.update(raw)
                content_h.update(raw)
                n_chars += len(part)
                n_bytes += len(raw)
                if pending is not None and mine:
                    job["texts"].append(pending)
                    job["conts"].append(ctx)
                    ctx = pending[-1:]
                    job["events"].append(("part", u, len(pending), first, False, None, None))
                    size += len(pending)
                    first = False
                    if size >= _BATCH_CHARS:
                        yield job
                        job, size = {"texts": [], "conts": [], "events": []}, 0
                pending = part
            reader["docs"] += 1
            reader["chars"] += n_chars
            if n_chars == 0:
                reader["empty"] += 1
            elif mine:
                score = int.from_bytes(score_h.digest()[:8], "little") / 2.0 ** 64
                digest = n_bytes.to_bytes(8, "little") + content_h.digest()
                force, tail = only.get(u, (None, False))
                skip = (self.val_only and first and not tail and score != force
                        and score >= self.val_fraction)  # a held-out domain's train doc
                job["texts"].append("" if skip else pending)
                job["conts"].append("" if skip else ctx)
                job["events"].append(("part", u, len(pending), first, True, score, digest))
                size += len(pending)
            if (reader["chars"] >= self.shard_chars
                    or reader["docs"] >= self.shard_docs):
                job["events"].append(("end", u, dict(reader), mine))
                u, reader = u + 1, {"docs": 0, "empty": 0, "chars": 0}
                mine = owns(u)
            if len(job["texts"]) >= max_docs or size >= _BATCH_CHARS or (
                    job["events"] and job["events"][-1][0] == "end"):
                yield job
                job, size = {"texts": [], "conts": [], "events": []}, 0
        if reader["docs"]:
            job["events"].append(("end", u, dict(reader), mine))
            u += 1
        job["events"].append(("done", u))
        yield job

    def _stream(self, staging, owns, only, tokenizing, units, bar) -> int:
        self.capped = False
        state = {"tokens": 0, "units": 0}
        for job in self._jobs(owns, only):
            check_stopped()
            tokenizing.submit(job)
            while tokenizing.full():
                self._consume(tokenizing.pop(), staging, only, units, bar, state)
        while tokenizing.pending:
            self._consume(tokenizing.pop(), staging, only, units, bar, state)
        return state["units"]

    def _consume(self, result, staging, only, units, bar, state) -> None:
        ids = iter(result["ids"])
        for event in result["events"]:
            if event[0] == "part":
                _, u, n_chars, first, last, score, digest = event
                part_ids = next(ids)
                if u not in units:
                    force, tail = only.get(u, (None, False))
                    units[u] = Unit(self, staging, u, force, tail)
                unit = units[u]
                before = unit.tokens()
                unit.part(part_ids, n_chars, first, last, score, digest)
                state["tokens"] += unit.tokens() - before
                bar.update(n_chars, len(part_ids), int(last))
                if self.cap and last and state["tokens"] >= self.cap:
                    self.capped = True  # the reader stops before the next document
            elif event[0] == "end":
                _, u, reader, mine = event
                if mine:
                    if u not in units:  # only empty documents
                        force, tail = only.get(u, (None, False))
                        units[u] = Unit(self, staging, u, force, tail)
                    units.pop(u).close(reader)
                else:
                    bar.update(reader["chars"], 0, reader["docs"])
            else:
                state["units"] = event[1]



def assemble(job: Job, staging: str, final: str, key: str) -> None:
    """Turns a staging folder of complete units into the final folder: the rare
    validation fallbacks (units rebuilt), meta.json, then one rename."""
    with open(sorted(glob.glob(os.path.join(staging, "shard-*.json")))[0]) as f:
        n_units = json.load(f)["units"]
    infos = _unit_infos(staging, n_units)
    n_docs = sum(i["n_documents"] - i["n_empty_documents"] for i in infos)
    d, val_fraction = job.d, job.val_fraction
    if n_docs == 0:
        raise PrepareError(f"Domain {d['name']!r} has no non-empty document "
                           f"({sum(i['n_empty_documents'] for i in infos)} empty); check "
                           f"its source.")
    val_docs = sum(i["splits"]["val"]["docs"] for i in infos)
    if val_fraction > 0 and (val_docs == 0 or n_docs == 1) and not any(
            i["tail_split"] or i["force_score"] is not None for i in infos):
        # Rare (tiny domains): the lowest-scoring documents (every copy of the same text)
        # go to validation, or a single document's tail is held out.
        if n_docs == 1:
            only = {i["unit"]: (None, True) for i in infos
                    if i["n_documents"] > i["n_empty_documents"]}
        else:
            low = min(i["min_train_score"] for i in infos)
            only = {i["unit"]: (low, False) for i in infos if i["min_train_score"] == low}
        for u in only:
            shutil.rmtree(os.path.join(staging, unit_name(u)))
        job.run(staging, (0, 1), only=only)
        infos = _unit_infos(staging, n_units)
    stats = {s: {"rows": 0, "docs": 0, "tokens": 0, "chars": 0, "pad_tokens": 0,
                 "shards": []} for s in SPLITS}
    content = hashlib.sha256()
    for info in infos:
        content.update(bytes.fromhex(info["content_sha256"]))
        unit_dir = os.path.join(staging, unit_name(info["unit"]))
        for s in SPLITS:
            st = info["splits"][s]
            for k in ("rows", "docs", "tokens", "chars", "pad_tokens"):
                stats[s][k] += st[k]
            if st["rows"]:
                name = f"{s}-{info['unit']:05d}.array_record"
                os.rename(os.path.join(unit_dir, f"{s}.array_record"),
                          os.path.join(staging, name))
                stats[s]["shards"].append({"file": name, "rows": st["rows"]})
        shutil.rmtree(unit_dir)
    for marker in glob.glob(os.path.join(staging, "shard-*.json")):
        os.remove(marker)
    if stats["train"]["rows"] == 0 and not job.val_only:
        raise PrepareError(f"Domain {d['name']!r}: no training rows (all {n_docs} documents "
                           f"went to validation); lower val_fraction={val_fraction}.")
    tok = job.tok
    meta = {"format": FORMAT_VERSION, "name": d["name"], "domain": d,
            "seq_len": job.seq_len, "row_len": job.seq_len + 1,
            "record": "int32 [2, seq_len + 1]: tokens, segment_ids (0 = padding)",
            "tokenizer_sha256": tok.sha256, "tokenizer_path": tok.path,
            "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": job.pad_id, "val_fraction": val_fraction, "seed": job.seed,
            "content_sha256": content.hexdigest(), "n_documents": n_docs,
            "n_empty_documents": sum(i["n_empty_documents"] for i in infos),
            "n_tokens": sum(s["tokens"] for s in stats.values()),
            "n_rows": sum(s["rows"] for s in stats.values()), "n_units": n_units,
            "splits": stats, "tail_split": any(i["tail_split"] for i in infos),
            "key": key}
    meta["files"] = {sh["file"]: file_integrity(os.path.join(staging, sh["file"]))
                     for s in SPLITS for sh in stats[s]["shards"]}
    with open(os.path.join(staging, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    try:
        os.rename(staging, final)
    except OSError:
        if not is_complete(final, key):  # lost a race only if the winner is complete
            raise
        shutil.rmtree(staging)


def _unit_infos(staging: str, n_units: int) -> list[dict]:
    infos = []
    for u in range(n_units):
        with open(os.path.join(staging, unit_name(u), "unit.json")) as f:
            infos.append(json.load(f))
    return infos

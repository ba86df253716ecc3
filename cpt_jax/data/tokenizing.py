"""Tokenizing a preparation's documents: in this process, or in a pool of workers.

``Tokenizing`` takes jobs (lists of texts) in and hands them back encoded, in order; past
``pool_min_chars`` characters of text, with more than one worker, it encodes on a pool of
spawned processes that rebuild the tokenizer (``_tokenizer_state``), since a pool costs
about a second to start. A later part of a file read in parts is encoded as the
continuation of its document (``_Encoder``), so the ids do not depend on where the file
was cut.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import pickle
import signal
import sys

import numpy as np

from cpt_jax.data import tokenizer as tokenizer_lib
from cpt_jax.data.prepare_errors import PrepareError
from cpt_jax.data.stop_signals import check_stopped
from cpt_jax.data.tokenizer import HFJsonTokenizer, SentencePieceTokenizer, Tokenizer


def _tokenizer_state(tok: Tokenizer):
    """What a worker process rebuilds the tokenizer from (None: not possible)."""
    if isinstance(tok, SentencePieceTokenizer):
        return ("sentencepiece", tok.proto, tok.path, tok.sha256)
    if isinstance(tok, HFJsonTokenizer) and tok.path:
        return ("hf_json", tok.path, tok.sha256)
    try:
        return ("object", pickle.dumps(tok), tok.sha256)
    except Exception:  # pylint: disable=broad-except
        return None


class _Encoder:
    """Encodes lists of texts. ``conts[i]`` is "" for a document's first part, else the
    character before part i (a later part of a file read in parts), which must be encoded
    as the continuation of its document: for SentencePiece without the dummy prefix; for
    other kinds as ``encode(ctx + part)`` minus the ids of ``encode(ctx)`` (which absorbs a
    prefix space a tokenizer adds to every text), when those are its first ids."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.sp_cont = None
        self.kwargs = {}
        if getattr(tok, "kind", "") == "sentencepiece":
            import sentencepiece as spm  # pylint: disable=import-outside-toplevel
            from sentencepiece import (  # pylint: disable=import-outside-toplevel
                sentencepiece_model_pb2)
            self.kwargs = {"num_threads": 1}
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(tok.proto)
            proto.normalizer_spec.add_dummy_prefix = False
            self.sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def __call__(self, texts: list[str], conts: list[str]) -> list[np.ndarray]:
        out: list = [None] * len(texts)
        plain = [i for i, c in enumerate(conts) if not c]
        if plain:
            for i, ids in zip(plain, self.tok.encode_batch([texts[i] for i in plain],
                                                           **self.kwargs)):
                out[i] = np.asarray(ids, np.int32)
        rest = [i for i, c in enumerate(conts) if c]
        if rest and self.sp_cont is not None:
            for i, ids in zip(rest, self.sp_cont.encode([texts[i] for i in rest],
                                                        num_threads=1)):
                out[i] = np.asarray(ids, np.int32)
        elif rest:
            joined = self.tok.encode_batch([conts[i] + texts[i] for i in rest])
            heads = self.tok.encode_batch([conts[i] for i in rest])
            for i, ids, head in zip(rest, joined, heads):
                if list(ids[:len(head)]) == list(head):
                    out[i] = np.asarray(ids[len(head):], np.int32)
                else:  # the context merged into the part: encode the part alone
                    out[i] = np.asarray(self.tok.encode(texts[i]), np.int32)
        return out


_worker_encoder: _Encoder | None = None


def _init_worker(state) -> None:
    """A worker's tokenizer. It never raises (a pool whose initializer fails restarts
    workers for ever): a failure is raised by the worker's first job instead."""
    global _worker_encoder  # pylint: disable=global-statement
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool
    try:
        if state[0] == "sentencepiece":
            tok = tokenizer_lib.SentencePieceTokenizer(state[1], path=state[2])
        elif state[0] == "hf_json":
            tok = tokenizer_lib.load_tokenizer(state[1])
        else:
            tok = pickle.loads(state[1])
        if tok.sha256 != state[-1]:
            raise PrepareError(f"the tokenizer {getattr(tok, 'path', None)} changed on "
                               f"disk during preparation; run again.")
        _worker_encoder = _Encoder(tok)
    except Exception as e:  # pylint: disable=broad-except
        _worker_encoder = e


def _work(texts: list[str], conts: list[str]) -> list[np.ndarray]:
    if isinstance(_worker_encoder, Exception):
        raise _worker_encoder
    return _worker_encoder(texts, conts)


class Tokenizing:
    """Jobs in, encoded jobs out, in order: in this process, or (past ``pool_min_chars``
    of text, with workers > 1) on a pool of ``workers`` processes with a bounded queue.
    ``pool_min_chars`` is ``prepare.POOL_MIN_CHARS``, passed down by the caller."""

    def __init__(self, tok: Tokenizer, workers: int, pool_min_chars: int):
        self.encode = _Encoder(tok)
        self.state = _tokenizer_state(tok) if workers > 1 else None
        self.workers = workers
        self.pool_min_chars = pool_min_chars
        self.pool = None
        self.chars = 0
        self.pending: collections.deque = collections.deque()

    def submit(self, job: dict) -> None:
        texts, conts = job["texts"], job["conts"]
        self.chars += sum(len(t) for t in texts)
        if (self.pool is None and self.state is not None
                and self.chars >= self.pool_min_chars):
            env = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1",
                   "OMP_NUM_THREADS": "1"}
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)  # inherited by the spawned workers
            # The workers need only this module: keep them from re-running the caller's
            # script (spawn imports __main__ by path unless it has no file or spec).
            main = sys.modules.get("__main__")
            hidden = {k: getattr(main, k) for k in ("__file__", "__spec__")
                      if main is not None and hasattr(main, k)}
            if "__file__" in hidden:
                del main.__file__
            if "__spec__" in hidden:
                main.__spec__ = None
            try:
                self.pool = multiprocessing.get_context("spawn").Pool(
                    self.workers, initializer=_init_worker, initargs=(self.state,))
                self.procs = list(self.pool._pool)  # pylint: disable=protected-access
            finally:
                for k, v in hidden.items():
                    setattr(main, k, v)
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        if self.pool is None:
            job["ids"] = self.encode(texts, conts) if texts else []
        else:
            job["async"] = self.pool.apply_async(_work, (texts, conts)) if texts else None
        self.pending.append(job)

    def full(self) -> bool:
        return len(self.pending) > (2 * self.workers if self.pool is not None else 0)

    def pop(self) -> dict:
        job = self.pending.popleft()
        if "async" in job:
            handle = job.pop("async")
            while handle is not None and not handle.ready():
                handle.wait(0.5)
                check_stopped()
                dead = [p.exitcode for p in self.procs if p.exitcode is not None]
                if dead:  # a lost job would never finish: say why instead of waiting
                    raise PrepareError(
                        f"a tokenizer worker process died (exit code {dead[0]}; out of "
                        f"memory?); run again with fewer data.workers.")
            job["ids"] = handle.get() if handle is not None else []
        return job

    def close(self, ok: bool) -> None:
        if self.pool is not None:
            if ok:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            self.pool = None


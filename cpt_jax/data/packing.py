"""Packing documents into rows, and the seeded train/validation score of a document.

Pure functions of their inputs: ``RowPacker`` streams ``[BOS] doc [EOS]`` token ids into
rows of ``seq_len + 1`` tokens with segment ids (1, 2, ... per document in a row, 0 for
padding), ``pack_documents`` is its in-memory form, and ``split_score`` is the hash that
sends a document to validation (``cpt_jax.data.prepare`` describes the whole layout).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np


class RowPacker:
    """Streams documents' token ids into rows of ``row_len`` tokens with segment ids.

    ``add(ids)`` appends one already-wrapped document; ``pop_rows()`` returns the complete
    rows so far as (tokens [N, row_len] int32, segment_ids [N, row_len] int32);
    ``finish()`` pads and returns the last partial row (if any).
    """

    def __init__(self, row_len: int, pad_id: int):
        self.row_len = int(row_len)
        self.pad_id = int(pad_id)
        self._tokens: list[np.ndarray] = []
        self._docs: list[np.ndarray] = []
        self._size = 0
        self._doc_counter = 0

    def add(self, ids: Sequence[int], continues: bool = False) -> None:
        """Appends a document's ids; ``continues``: more ids of the last document."""
        ids = np.asarray(ids, dtype=np.int32)
        if not continues:
            self._doc_counter += 1
        self._tokens.append(ids)
        self._docs.append(np.full(ids.shape, self._doc_counter, dtype=np.int64))
        self._size += ids.size

    def pending(self) -> int:
        """Number of complete rows waiting in the buffer."""
        return self._size // self.row_len

    def pop_rows(self) -> tuple[np.ndarray, np.ndarray]:
        n = self._size // self.row_len
        tokens = np.concatenate(self._tokens) if self._tokens else np.zeros(0, np.int32)
        docs = np.concatenate(self._docs) if self._docs else np.zeros(0, np.int64)
        cut = n * self.row_len
        self._tokens, self._docs = [tokens[cut:]], [docs[cut:]]
        self._size -= cut
        return tokens[:cut].reshape(n, self.row_len), _segments(
            docs[:cut].reshape(n, self.row_len))

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Complete rows plus the padded last row; the packer is empty afterwards."""
        full_t, full_s = self.pop_rows()
        rest = self._size
        if rest == 0:
            return full_t, full_s
        tokens = np.full((1, self.row_len), self.pad_id, np.int32)
        docs = np.zeros((1, self.row_len), np.int64)
        tokens[0, :rest] = self._tokens[0]
        docs[0, :rest] = self._docs[0]
        segs = _segments(docs)
        segs[0, rest:] = 0
        self._tokens, self._docs, self._size = [], [], 0
        return np.concatenate([full_t, tokens]), np.concatenate([full_s, segs])


def _segments(docs_NL: np.ndarray) -> np.ndarray:
    """Segment ids 1, 2, ... numbering the distinct documents of each row, left to right."""
    change = np.zeros(docs_NL.shape, np.int32)
    change[:, 1:] = docs_NL[:, 1:] != docs_NL[:, :-1]
    return (1 + np.cumsum(change, axis=1)).astype(np.int32)


def pack_documents(docs_ids: Iterable[Sequence[int]], seq_len: int, bos_id: int,
                   eos_id: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Packs token-id lists as [BOS] doc [EOS] into rows; returns (tokens, segment_ids).

    Both arrays are int32 [N, seq_len + 1]. In-memory version of what prepare writes.
    """
    packer = RowPacker(seq_len + 1, pad_id)
    for ids in docs_ids:
        packer.add([bos_id, *ids, eos_id])
    return packer.finish()


def split_score(text: str, seed: int) -> float:
    """A uniform number in [0, 1) from a seeded hash of the document text."""
    digest = hashlib.sha256(f"{int(seed)}\0".encode() + text.encode("utf-8", "replace"))
    return int.from_bytes(digest.digest()[:8], "little") / 2.0 ** 64


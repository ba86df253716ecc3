"""A keyed pseudo-random permutation of [0, n) with random access: how every part of the
run draws rows (the sampler's streams, DER's recorded rows, EWC's Fisher rows).

A balanced Feistel network with cycle walking: O(1) memory for any number of rows, and
item i of the permutation is computed directly, so step t's rows never require replaying
steps < t. The keys are a hash of (seed, stream, task, epoch).
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np

ROUNDS = 6


@functools.lru_cache(maxsize=4096)
def round_keys(seed: int, stream: str, task: int, epoch: int) -> np.ndarray:
    """The ROUNDS uint64 round keys of the permutation named (seed, stream, task, epoch)."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{task}/{epoch}".encode(),
                             digest_size=8 * ROUNDS).digest()
    return np.frombuffer(digest, dtype=np.uint64).copy()


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (uint64 arithmetic wraps)."""
    x = x * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def feistel_permute(i, n: int, keys: np.ndarray) -> np.ndarray:
    """Maps indices ``i`` in [0, n) through a keyed pseudo-random bijection of [0, n).

    A balanced Feistel network over 2h bits (4^h >= n, so fewer than 4n states) is a
    bijection of [0, 4^h); cycle walking (re-applying it until the value is < n) restricts
    it to a bijection of [0, n). O(1) memory; expected fewer than 4 walks per index.
    """
    i = np.asarray(i, dtype=np.int64)
    if n < 1:
        raise ValueError(f"Cannot permute an empty range (n={n}).")
    if i.size and (i.min() < 0 or i.max() >= n):
        raise IndexError(f"Permutation indices must be in [0, {n}).")
    if n == 1:
        return np.zeros_like(i)
    half = max(1, math.ceil(math.ceil(math.log2(n)) / 2))
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)

    def encrypt(x):
        left, right = x >> shift, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << shift) | right

    x = encrypt(i.astype(np.uint64))
    out = x >= np.uint64(n)
    while out.any():
        x[out] = encrypt(x[out])
        out = x >= np.uint64(n)
    return x.astype(np.int64)


def stream_items(seed: int, stream: str, task: int, positions, n: int) -> np.ndarray:
    """Items at ``positions`` (any int array >= 0) of the stream that walks [0, n) epoch by
    epoch, each epoch a fresh permutation: every item is seen once per epoch before any
    repeats."""
    pos = np.asarray(positions, dtype=np.int64)
    epoch, offset = np.divmod(pos, n)
    out = np.empty(pos.shape, np.int64)
    for e in np.unique(epoch):
        sel = epoch == e
        out[sel] = feistel_permute(offset[sel], n, round_keys(seed, stream, int(task), int(e)))
    return out


def permuted_stream(seed: int, stream: str, task: int, first: int, count: int,
                    n: int) -> np.ndarray:
    """Items [first, first + count) of ``stream_items``' stream."""
    return stream_items(seed, stream, task, np.arange(first, first + count, dtype=np.int64), n)


def draw_rows(seed: int, stream: str, task: int, count: int, n: int) -> np.ndarray:
    """``count`` distinct rows of [0, n) (all of them, in permuted order, when count >= n)
    drawn by the permutation named (seed, stream, task): e.g. EWC's Fisher rows."""
    return feistel_permute(np.arange(min(int(count), n)), n, round_keys(seed, stream, task, 0))

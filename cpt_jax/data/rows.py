"""Reading rows from several prepared splits: ``read_rows`` gathers a batch's rows from
their domains, and ``ConcatRows`` presents several prepared splits as one, for joint training on the union of
all tasks' data: the usual upper reference of continual learning, where nothing is
forgotten because nothing is sequential.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

def read_rows(sources: Sequence, domain: np.ndarray, row: np.ndarray):
    """tokens, segment_ids [N, L+1] for rows `row` of sources[domain] (one read per source)."""
    n, row_len = len(row), sources[0].row_len
    tokens = np.empty((n, row_len), np.int32)
    segs = np.empty((n, row_len), np.int32)
    for d in np.unique(domain):
        sel = np.flatnonzero(domain == d)
        tokens[sel], segs[sel] = sources[int(d)].read(row[sel])
    return tokens, segs


class ConcatRows:
    """The rows of several ``PackedRows`` (or objects with its interface) as one split.

    Global row ``i`` is row ``i - starts[s]`` of source ``s``, with ``starts`` the
    cumulative row counts, in the order given: sources are concatenated, not interleaved
    (the sampler's permutation does the mixing). For joint training pass every task's train
    split and treat the result as a single task whose budget is the sum of the tasks'
    budgets; evaluate on the parts as usual.

    ``read(indices)`` returns (tokens [N, row_len] int32, segment_ids [N, row_len] int32) in
    the order of ``indices`` (repeats allowed), with one ``read`` call per source that owns
    any of them.
    """

    def __init__(self, sources: Sequence):
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("ConcatRows needs at least one source.")
        lens = {(int(s.seq_len), int(s.row_len)) for s in self.sources}
        if len(lens) != 1:
            raise ValueError(f"ConcatRows sources differ in (seq_len, row_len): "
                             f"{sorted(lens)}; prepare every domain with the same seq_len.")
        self.seq_len, self.row_len = lens.pop()
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in self.sources])]
                                     ).astype(np.int64)  # [S + 1]
        self.num_rows = int(self.starts[-1])

    def __len__(self) -> int:
        return self.num_rows

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(source [N] int64, local row [N] int64) of global row ids."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"Row indices must be in [0, {self.num_rows}) for {self!r}, got "
                             f"min {idx.min()} max {idx.max()}.")
        source = np.searchsorted(self.starts, idx, side="right") - 1
        return source, idx - self.starts[source]

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        return read_rows(self.sources, *self.locate(indices))

    def __repr__(self):
        return f"ConcatRows({len(self.sources)} sources, rows={self.num_rows}, " \
               f"seq_len={self.seq_len})"

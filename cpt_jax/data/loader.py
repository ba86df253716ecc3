"""Global sharded batches for the train step, prefetched on a background thread.

The sampler says which rows make batch (task, step); the loader reads only the rows that
this process's devices hold (multi-host: each process feeds its own share) and assembles
global ``jax.Array``s sharded over the batch axes (data, fsdp). Batches are a pure function
of (task, step), so the loader can start at any step (resume needs no iterator state).
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Iterator, NamedTuple, Sequence

import jax
import numpy as np

from cpt_jax import sharding as sharding_lib
from cpt_jax.data.rows import read_rows
from cpt_jax.data.packed_rows import PackedRows

if TYPE_CHECKING:  # the loader reads what a sampler picks; it needs no sampler code
    from cpt_jax.replay.sampler import ReplaySampler


def process_row_range(mesh, global_batch: int) -> tuple[int, int]:
    """[lo, hi) rows of the global batch held by this process's devices."""
    sharding = sharding_lib.batch_sharding(mesh, 1)
    slices = sharding.addressable_devices_indices_map((global_batch,)).values()
    starts = [s[0].start or 0 for s in slices]
    stops = [s[0].stop if s[0].stop is not None else global_batch for s in slices]
    lo, hi = min(starts), max(stops)
    return lo, hi


def to_global(mesh, local: dict, global_batch: int, lo: int) -> dict:
    """Assemble process-local rows [lo, lo + n) into global arrays sharded over the batch."""
    out = {}
    for name, x in local.items():
        shape = (global_batch,) + x.shape[1:]
        sharding = sharding_lib.batch_sharding(mesh, x.ndim)
        out[name] = jax.make_array_from_callback(
            shape, sharding, lambda idx, x=x: x[_shift(idx[0], lo, global_batch)])
    return out


def _shift(s: slice, lo: int, n: int) -> slice:
    start = (s.start or 0) - lo
    stop = (s.stop if s.stop is not None else n) - lo
    return slice(start, stop)


class Batch(NamedTuple):
    """One step's global batch. ``arrays``: tokens and segment_ids [B, L+1] int32 (plus a
    method's per-row extras), global arrays sharded over the batch axes. On the host:
    ``n_replay``, how many of the B rows are replayed (static for the train step, which
    splits the batch at ``replay_positions(B, n_replay)``), and ``is_replay`` [rows of
    this process] bool."""

    arrays: dict
    n_replay: int
    is_replay: np.ndarray


class BatchLoader:
    """Reads the global batch of (task, step) for the train step.

    Args:
      sampler: which rows make each batch.
      sources: PackedRows of each task's train split, in task order (the sampler's domains).
      mesh: the device mesh; batches are sharded over its (data, fsdp) axes.
    """

    def __init__(self, sampler: "ReplaySampler", sources: Sequence[PackedRows], mesh,
                 extras=None):
        self.sampler, self.sources, self.mesh = sampler, list(sources), mesh
        # extras(task, step, BatchIndex of this process's rows) -> {name: [n, ...] array}:
        # per-row data a method adds to the batch (e.g. stored DER logits).
        self.extras = extras
        B = sampler.global_batch
        div = sharding_lib.batch_divisor(mesh)
        if B % div:
            raise ValueError(f"global_batch={B} must be a multiple of the {div} batch shards "
                             f"(mesh data x fsdp); change global_batch or the mesh.")
        self.lo, self.hi = process_row_range(mesh, B)

    def host_batch(self, task: int, step: int) -> Batch:
        """This process's rows of batch (task, step) as numpy arrays."""
        idx = self.sampler.batch(task, step)
        sl = slice(self.lo, self.hi)
        tokens, segs = read_rows(self.sources, idx.domain[sl], idx.row[sl])
        out = {"tokens": tokens, "segment_ids": segs}
        if idx.weight is not None:  # a weighted replay pool (e.g. a coreset's weights)
            out["row_weight"] = idx.weight[sl]
        if self.extras is not None:
            out.update(self.extras(task, step, idx.shard_range(self.lo, self.hi)))
        return Batch(out, int(idx.is_replay.sum()), idx.is_replay[sl])

    def iterate(self, task: int, start: int, stop: int, prefetch: int = 2) -> Iterator[Batch]:
        """Batches of steps [start, stop) of `task`, read `prefetch` steps ahead on a thread."""
        q: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
        stop_flag = threading.Event()

        def produce():
            try:
                for step in range(start, stop):
                    if stop_flag.is_set():
                        return
                    q.put(("ok", self.host_batch(task, step)))
                q.put(("done", None))
            except BaseException as e:  # surfaced in the consumer
                q.put(("error", e))

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while True:
                kind, item = q.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise item
                yield item._replace(arrays=to_global(self.mesh, item.arrays,
                                                     self.sampler.global_batch, self.lo))
        finally:
            stop_flag.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)


def eval_batches(val: PackedRows, max_rows: int, batch: int, mesh) -> list[dict]:
    """A fixed set of validation rows (the first `max_rows`), cut into global batches.

    The last batch is padded with all-padding rows (segment id 0), which carry no loss.
    """
    n = min(len(val), max_rows)
    lo, hi = process_row_range(mesh, batch)
    out = []
    for start in range(0, n, batch):
        rows = np.arange(start, min(start + batch, n))
        tokens, segs = val.read(rows)
        pad = batch - len(rows)
        if pad:
            tokens = np.concatenate([tokens, np.zeros((pad, tokens.shape[1]), np.int32)])
            segs = np.concatenate([segs, np.zeros((pad, segs.shape[1]), np.int32)])
        out.append(to_global(mesh, {"tokens": tokens[lo:hi], "segment_ids": segs[lo:hi]},
                             batch, lo))
    return out

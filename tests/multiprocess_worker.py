"""One process of the multi-process train test (tests/test_multiprocess.py); not a test itself.

Runs a few sharded train steps with replay on a tiny Llama with the project's real pieces
(run config, ``maybe_initialize_distributed``, mesh, ReplaySampler, BatchLoader, train state,
train step, optimizer) on each ``--mesh`` in turn, and writes what the test compares:

    OUT/<mesh>/process{i}.json  this process's batch rows [lo, hi), how many rows its sources
                                read, the fraction of each parameter it holds, the per-step
                                metrics, its device counts
    OUT/<mesh>/params.npz       (process 0 only) the final parameters, gathered from all
                                processes

Launched by the test with XLA_FLAGS=--xla_force_host_platform_device_count=N and
JAX_PLATFORMS=cpu: either as one of several processes joined through a coordinator on
localhost (``--num-processes 2 --process-id i --port P``), or alone as the reference.

The worker asserts, in every process, that the loader reads only the rows of the global batch
held by this process's devices (half of it for two processes), and that the global batch it
assembles holds the sampler's rows at the right positions.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time
import traceback
from collections import Counter

import jax
import numpy as np
from jax.experimental import multihost_utils

from cpt_jax import cli
from cpt_jax import pretrained
from cpt_jax import sharding as sharding_lib
from cpt_jax.data.loader import BatchLoader, process_row_range
from cpt_jax.replay.sampler import ReplaySampler
from cpt_jax.methods import make_optimizer
from cpt_jax.optim.schedules import make_schedule
from cpt_jax.core.state import Placement, create_train_state
from cpt_jax.train.step import make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GLOBAL_BATCH = 8
SEQ_LEN = 16
VOCAB = 160
TASK_ROWS = [48, 40]  # training rows of task 0, task 1
REPLAY_RATE = 0.25  # task 1's batches: 6 new rows and 2 rows replayed from task 0
TASK, STEPS = 1, 3  # the steps run: task 1, steps 0..2 (one compiled step for n_replay = 2)


class MemoryRows:
    """In-memory packed rows of one domain (a PackedRows stand-in) that log every read.

    Row r of domain d is fixed by (d, r): random tokens, two documents split at a
    row-dependent position, and padding (segment 0) at the end of every third row.
    """

    def __init__(self, domain: int, n: int, row_len: int):
        self.domain, self.n, self.row_len = domain, n, row_len
        rng = np.random.default_rng(1000 + domain)
        self.tokens = rng.integers(0, VOCAB, size=(n, row_len), dtype=np.int32)
        self.segs = np.ones((n, row_len), np.int32)
        for r in range(n):
            self.segs[r, 3 + r % (row_len - 6):] = 2
            if r % 3 == 0:
                self.segs[r, row_len - 2:] = 0
        self.reads: list[int] = []  # every row index read, in order
        self._lock = threading.Lock()  # the loader reads on its prefetch thread

    def __len__(self):
        return self.n

    def read(self, rows):
        rows = np.asarray(rows)
        with self._lock:
            self.reads.extend(int(r) for r in rows)
        return self.tokens[rows].copy(), self.segs[rows].copy()


def parse_mesh(text: str) -> dict:
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}


def train(config, mesh_axes: dict, out: str, log) -> None:
    """Steps 0..STEPS-1 of task TASK on `mesh_axes`; writes OUT/process{i}.json and (process
    0) OUT/params.npz."""
    config = copy.deepcopy(config)
    config.mesh.update(mesh_axes)
    pid, nproc = jax.process_index(), jax.process_count()

    # ---- mesh, sampler, loader
    mesh = sharding_lib.make_mesh(config.mesh.to_dict())
    rules = sharding_lib.rules_from_config(config.sharding_rules)
    mcfg = pretrained.model_config(config)
    sources = [MemoryRows(d, n, SEQ_LEN + 1) for d, n in enumerate(TASK_ROWS)]
    sampler = ReplaySampler(TASK_ROWS, GLOBAL_BATCH, rate=config.replay.rate,
                            accounting=config.replay.accounting, seed=config.seed)
    loader = BatchLoader(sampler, sources, mesh)
    lo, hi = loader.lo, loader.hi
    assert (lo, hi) == process_row_range(mesh, GLOBAL_BATCH)
    # This process's devices hold exactly the rows [lo, hi), i.e. 1/nproc of the batch, and
    # the loader reads nothing else (checked below against the sources' read logs).
    held = set()
    for idx in sharding_lib.batch_sharding(mesh, 1).addressable_devices_indices_map(
            (GLOBAL_BATCH,)).values():
        held.update(range(GLOBAL_BATCH)[idx[0]])
    assert held == set(range(lo, hi)), (sorted(held), lo, hi)
    assert hi - lo == GLOBAL_BATCH // nproc, (lo, hi, nproc)

    # ---- state and step
    schedule = make_schedule(config.optim, STEPS)
    tx = make_optimizer(config, schedule)
    state, shardings = create_train_state(mcfg, tx, mesh, rules, jax.random.key(config.seed))
    step_fn = make_train_step(Placement(mcfg, mesh, rules, shardings), tx, config.microbatches,
                              schedule)
    log("state created")

    metrics_log, expected_reads = [], [Counter() for _ in sources]
    task = TASK
    for step, batch in enumerate(loader.iterate(task, 0, STEPS)):
        idx = sampler.batch(task, step)
        for d, r in zip(idx.domain[lo:hi], idx.row[lo:hi]):
            expected_reads[int(d)][int(r)] += 1
        # Every local shard of the global batch holds the sampler's rows.
        for shard in batch.arrays["tokens"].addressable_shards:
            rows = range(GLOBAL_BATCH)[shard.index[0]]
            want = np.stack([sources[idx.domain[r]].tokens[idx.row[r]] for r in rows])
            np.testing.assert_array_equal(np.asarray(shard.data), want)
        np.testing.assert_array_equal(batch.is_replay, idx.is_replay[lo:hi])
        n_replay = sampler.n_replay(task, step)
        assert n_replay == batch.n_replay == round(REPLAY_RATE * GLOBAL_BATCH)
        assert idx.is_replay[lo:hi].sum() == n_replay // nproc  # replay on every process
        state, metrics = step_fn(state, batch.arrays, n_replay)
        metrics_log.append({"task": task, "step": step, "n_replay": n_replay,
                            **{k: np.asarray(v).tolist() for k, v in metrics.items()}})
        log(f"step {step} loss {metrics_log[-1]['loss']:.6f}")

    reads = [Counter(s.reads) for s in sources]
    assert reads == expected_reads, (reads, expected_reads)
    n_read = sum(len(s.reads) for s in sources)
    assert n_read == STEPS * GLOBAL_BATCH // nproc, n_read

    # Which fraction of each parameter this process holds (1.0: a full copy).
    held_fraction = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        cells = set()
        for index in leaf.sharding.addressable_devices_indices_map(leaf.shape).values():
            cells.add(tuple((sl.start or 0, sl.stop) for sl in index))
        held_fraction[jax.tree_util.keystr(path)] = sum(
            np.prod([(b if b is not None else n) - a for (a, b), n in zip(c, leaf.shape)])
            for c in cells) / leaf.size

    # ---- outputs: gathering is a collective, so every process takes part. One jit to a
    # replicated layout (one compile for the whole tree), then this process's copy.
    full = jax.jit(lambda p: p, out_shardings=sharding_lib.replicated(mesh))(state.params)
    params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), full)
    log("gathered")
    info = {"process_index": pid, "process_count": nproc,
            "local_devices": jax.local_device_count(), "devices": jax.device_count(),
            "mesh": dict(mesh.shape), "rows": [lo, hi], "rows_read": n_read,
            "held_fraction": held_fraction, "metrics": metrics_log,
            "final_step": int(state.step.addressable_data(0))}
    os.makedirs(out, exist_ok=True)
    if pid == 0:
        flat = {jax.tree_util.keystr(path): leaf
                for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(os.path.join(out, "params.npz"), **flat)
    with open(os.path.join(out, f"process{pid}.json"), "w") as f:
        json.dump(info, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="one subfolder per mesh is written here")
    ap.add_argument("--mesh", action="append", required=True,
                    help="e.g. data=2,fsdp=2; repeat to train on several meshes in turn")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()

    def log(msg):
        print(f"[process {args.process_id} +{time.perf_counter() - t0:.1f}s] {msg}", flush=True)

    # ---- the run config, and joining the other processes through the production path
    config = cli.load_config_file(os.path.join(REPO, "configs", "tiny.py"))
    config.model.vocab_size = VOCAB
    config.seq_len, config.global_batch = SEQ_LEN, GLOBAL_BATCH
    config.optim.lr, config.optim.warmup_steps = 1e-2, 2
    config.replay.rate = REPLAY_RATE
    multi = args.num_processes > 1
    if multi:
        config.distributed.update(dict(enabled=True,
                                       coordinator_address=f"localhost:{args.port}",
                                       num_processes=args.num_processes,
                                       process_id=args.process_id))
    sharding_lib.maybe_initialize_distributed(config)
    pid, nproc = jax.process_index(), jax.process_count()
    assert (pid, nproc) == (args.process_id, args.num_processes), (pid, nproc)
    if multi:
        assert jax.config.jax_cpu_collectives_implementation == "gloo"
    log(f"joined: {nproc} processes, {jax.local_device_count()} of {jax.device_count()} "
        "devices here")

    for text in args.mesh:
        log(f"mesh {text}")
        train(config, parse_mesh(text), os.path.join(args.out, mesh_name(text)), log)
    if multi:
        multihost_utils.sync_global_devices("multiprocess_worker done")
        jax.distributed.shutdown()
    log("done")


def mesh_name(text: str) -> str:
    return text.replace("=", "").replace(",", "_")


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        # Exit at once: a normal exit would wait in jax.distributed's shutdown barrier for the
        # other processes, which wait for this one (the test then stops them all).
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

"""Dark Experience Replay (Buzzega et al. 2020, "Dark Experience for General Continual
Learning: a Strong, Simple Baseline"): a row's logits are stored when it is first trained
on, and replayed rows add ``weight * ||z - stored||^2`` (``der_loss``; with the
ordinary next-token loss on replayed rows this is DER++). Only the top-k logits per token
are kept (``topk_logits`` says how much memory that saves), in a host-side
``DERStore`` checkpointed with the run.

Keys: ``method.der.weight`` (> 0), ``k``, ``rows_per_domain``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax import model as model_lib
from cpt_jax import sharding as sharding_lib
from cpt_jax.methods.base import Method, MethodMemory
from cpt_jax.replay.policies import policy_names
from cpt_jax.replay.permutation import draw_rows


def topk_logits(logits_BLV, k: int):
    """(values [B, L, k] float, indices [B, L, k] int32): the k largest logits per token.

    Values keep the logits' dtype and are sorted in decreasing order. What DER stores for a
    row when it is first seen. Memory per token, storing values as 2-byte floats and indices
    as int32 (6 bytes per entry), against the full logits in bf16 (2 bytes per entry):

    - V = 32000 (Llama 2): full 64,000 B/token, 131,072,000 B (131 MB, 125 MiB) per
      2048-token row; top-32: 192 B/token, 393,216 B (384 KiB) per row: 333x less.
    - V = 128256 (Llama 3): full 256,512 B/token (525 MB per row); top-32: 1336x less.

    So 10,000 stored 2048-token rows take 3.9 GB at k = 32, against 1.3 TB of full logits.
    """
    if not 1 <= int(k) <= logits_BLV.shape[-1]:
        raise ValueError(f"k={k} must be in [1, vocab size {logits_BLV.shape[-1]}].")
    values, indices = jax.lax.top_k(logits_BLV, int(k))
    return values, indices.astype(jnp.int32)


def der_loss(student_logits_BLV, stored_values_BLK, stored_indices_BLK, mask_BL):
    """(sum over masked tokens of mean_k (z[idx_k] - v_k)^2, masked token count), float32.

    Dark Experience Replay (Buzzega et al. 2020) adds ``alpha * ||z - h(x)||^2`` on buffer
    examples, where ``h(x)`` are the logits recorded when the example was first seen and z
    the current logits; the authors' code computes it as a mean squared error over the
    logits. DER matches *logits* rather than probabilities on purpose: logits keep the
    information that softmax removes (their scale and shift).

    Variant here: only the k stored entries are compared: the student's logits gathered at
    the stored indices against the stored values, squared error averaged over the k entries
    of a token (so the term's scale does not depend on k), summed over masked tokens. The
    other V - k logits are unconstrained. (An alternative for top-k storage is a KL between
    the stored top-k renormalised by softmax and the student's softmax over the same k
    indices; that ignores logit shifts, which is what DER deliberately does not do.) When
    the replayed rows also get the ordinary next-token loss, as in this codebase's replay,
    the combination is DER++ (Buzzega et al.'s variant with the extra label term).
    """
    gathered_BLK = jnp.take_along_axis(student_logits_BLV.astype(jnp.float32),
                                       stored_indices_BLK.astype(jnp.int32), axis=-1)
    se_BL = jnp.mean(jnp.square(gathered_BLK - stored_values_BLK.astype(jnp.float32)), axis=-1)
    mask = mask_BL.astype(jnp.float32)
    return jnp.sum(se_BL * mask), jnp.sum(mask)


class DERStore:
    """Host-side top-k logits of replay rows, keyed by (domain, row), at most
    ``rows_per_domain`` rows per domain.

    Which rows: ``selected(domain, num_rows)`` is the first ``rows_per_domain`` entries of a
    seeded pseudo-random permutation of the domain's ``num_rows`` rows (the sampler's keyed
    Feistel permutation, keyed by ``(seed, "der", domain)``): a uniform sample without
    replacement that depends only on (seed, domain, num_rows), not on the training order,
    and needs O(rows_per_domain) memory. The training loop stores a selected row's top-k
    logits the first time it trains on it (``wants`` tells which rows of a batch those are);
    DER's reservoir sampling is replaced by this fixed rule so a run stays a pure function
    of its config and survives a restart (run checkpoints store ``to_arrays()``).

    ``add`` keeps the first logits given for a row (DER records them once) and refuses to
    exceed the bound. Values are kept as ``values_dtype`` (float16 by default: 2 bytes, 3
    more mantissa bits than bfloat16, finite for |z| < 65504), indices as int32. A row's
    entries are ``topk_logits`` of the model's logits on its inputs: [L = seq_len, k].
    """

    def __init__(self, k: int, rows_per_domain: int, seed: int = 0,
                 values_dtype=np.float16):
        if int(k) < 1 or int(rows_per_domain) < 1:
            raise ValueError(f"DERStore needs k >= 1 and rows_per_domain >= 1, got k={k}, "
                             f"rows_per_domain={rows_per_domain}.")
        self.k, self.rows_per_domain, self.seed = int(k), int(rows_per_domain), int(seed)
        self.values_dtype = np.dtype(values_dtype)
        self._slots: dict[int, dict[int, int]] = {}  # domain -> {row: slot}
        self._values: dict[int, np.ndarray] = {}  # domain -> [rows_per_domain, L, k]
        self._indices: dict[int, np.ndarray] = {}  # domain -> [rows_per_domain, L, k] int32

    # -- which rows ----------------------------------------------------------------------

    def selected(self, domain: int, num_rows: int) -> np.ndarray:
        """Sorted int64 row ids of ``domain`` whose logits the store is meant to hold."""
        return np.sort(draw_rows(self.seed, "der", int(domain), self.rows_per_domain,
                                 int(num_rows)))

    def wants(self, domain: int, rows, num_rows: int) -> np.ndarray:
        """bool [N]: rows that are selected and not stored yet (store them now)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        return np.isin(rows, self.selected(domain, num_rows)) & ~self.has(domain, rows)

    # -- contents ------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(s) for s in self._slots.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by stored rows (allocated arrays may be larger)."""
        per = {d: v[0].nbytes + self._indices[d][0].nbytes for d, v in self._values.items()}
        return sum(per[d] * len(s) for d, s in self._slots.items())

    def has(self, domain, rows) -> np.ndarray:
        """bool [N]: whether (domain, row) is stored; ``domain`` is an int or an array [N]."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        domains = np.broadcast_to(np.asarray(domain, np.int64), rows.shape)
        return np.fromiter((int(r) in self._slots.get(int(d), ()) for d, r in
                            zip(domains, rows)), bool, count=rows.size)

    def add(self, domain: int, rows, values_NLK, indices_NLK) -> int:
        """Stores the rows not stored yet; returns how many were added."""
        domain = int(domain)
        rows = np.asarray(rows, np.int64).reshape(-1)
        values, indices = np.asarray(values_NLK), np.asarray(indices_NLK)
        if values.shape != indices.shape or values.ndim != 3 or values.shape[0] != rows.size \
                or values.shape[2] != self.k:
            raise ValueError(f"add: values {values.shape} and indices {indices.shape} must "
                             f"both be [len(rows)={rows.size}, L, k={self.k}].")
        slots = self._slots.setdefault(domain, {})
        if domain in self._values and self._values[domain].shape[1] != values.shape[1]:
            raise ValueError(f"add: domain {domain} holds rows of {self._values[domain].shape[1]}"
                             f" tokens, got {values.shape[1]}.")
        _, first = np.unique(rows, return_index=True)
        new = [i for i in sorted(first) if int(rows[i]) not in slots]
        if len(slots) + len(new) > self.rows_per_domain:
            raise ValueError(f"add: domain {domain} would hold {len(slots) + len(new)} rows, "
                             f"over rows_per_domain={self.rows_per_domain}; add only the rows "
                             f"that wants(...) returns.")
        if not new:
            return 0
        if domain not in self._values:
            shape = (self.rows_per_domain, values.shape[1], self.k)
            self._values[domain] = np.zeros(shape, self.values_dtype)
            self._indices[domain] = np.zeros(shape, np.int32)
        at = np.arange(len(slots), len(slots) + len(new))
        self._values[domain][at] = values[new].astype(self.values_dtype)
        self._indices[domain][at] = indices[new].astype(np.int32)
        slots.update((int(rows[i]), int(s)) for i, s in zip(new, at))
        return len(new)

    def get(self, domain, rows, fill_missing: bool = False):
        """(values [N, L, k] float32, indices [N, L, k] int32) of (domain, rows).

        ``domain`` is an int or an array [N] (a replay batch mixes domains). A row not
        stored raises KeyError, unless ``fill_missing``: then it gets zeros (mask it out with
        ``has``, e.g. ``mask_BL * has(...)[:, None]``).
        """
        rows = np.asarray(rows, np.int64).reshape(-1)
        domains = np.broadcast_to(np.asarray(domain, np.int64), rows.shape)
        length = {self._values[d].shape[1] for d in set(domains.tolist()) if d in self._values}
        if len(length) > 1:
            raise ValueError(f"get: the domains {sorted(set(domains.tolist()))} hold rows of "
                             f"different lengths {sorted(length)}.")
        L = length.pop() if length else 0
        values = np.zeros((rows.size, L, self.k), np.float32)
        indices = np.zeros((rows.size, L, self.k), np.int32)
        for i, (d, r) in enumerate(zip(domains.tolist(), rows.tolist())):
            slot = self._slots.get(d, {}).get(r)
            if slot is None:
                if not fill_missing:
                    raise KeyError(f"DERStore has no logits for (domain {d}, row {r}); check "
                                   f"has(...) first or pass fill_missing=True.")
                continue
            values[i] = self._values[d][slot]
            indices[i] = self._indices[d][slot]
        return values, indices

    def retain(self, domain: int, rows) -> None:
        """Drops the stored rows of ``domain`` not in ``rows`` (a buffer's eviction)."""
        slots = self._slots.get(int(domain))
        if not slots:
            return
        wanted = set(np.asarray(rows, np.int64).reshape(-1).tolist())
        keep = [r for r in sorted(slots, key=slots.get) if r in wanted]
        at = np.asarray([slots[r] for r in keep], np.int64)
        self._values[domain][:len(keep)] = self._values[domain][at]
        self._indices[domain][:len(keep)] = self._indices[domain][at]
        self._slots[domain] = {r: i for i, r in enumerate(keep)}

    # -- persistence ---------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The store as named numpy arrays (what run checkpoints write)."""
        arrays = {"config": np.asarray([self.k, self.rows_per_domain, self.seed], np.int64),
                  "values_dtype": np.frombuffer(self.values_dtype.str.encode(), np.uint8)}
        for d, slots in self._slots.items():
            order = sorted(slots, key=slots.get)  # rows by slot
            at = np.asarray([slots[r] for r in order], np.int64)
            arrays[f"rows_{d}"] = np.asarray(order, np.int64)
            arrays[f"values_{d}"] = self._values[d][at] if d in self._values else np.zeros(
                (0, 0, self.k), self.values_dtype)
            arrays[f"indices_{d}"] = self._indices[d][at] if d in self._indices else np.zeros(
                (0, 0, self.k), np.int32)
        return arrays

    @classmethod
    def from_arrays(cls, arrays) -> "DERStore":
        """The store ``to_arrays`` described."""
        k, rows_per_domain, seed = (int(x) for x in np.asarray(arrays["config"]))
        dtype = np.dtype(np.asarray(arrays["values_dtype"], np.uint8).tobytes().decode())
        store = cls(k, rows_per_domain, seed, dtype)
        for name in arrays:
            if name.startswith("rows_"):
                d = int(name[len("rows_"):])
                rows = np.asarray(arrays[name])
                store._slots[d] = {}
                if rows.size:
                    store.add(d, rows, np.asarray(arrays[f"values_{d}"]),
                              np.asarray(arrays[f"indices_{d}"]))
        return store


class DERRecorder(MethodMemory):
    """Dark Experience Replay's memory (Buzzega et al. 2020) for the task loop.

    A fixed, seeded subset of every task's rows (``method.der.rows_per_domain``) gets its
    top-k logits recorded the first time it is trained on, by a forward pass on just those
    rows right before the step that sees them (DER records the logits the model produces
    when it meets the example). When such a row is later replayed, its stored logits ride
    along in the batch (``der_values``, ``der_indices``, ``der_valid``) and the loss adds
    DER's logit-matching term. Top-k instead of full-vocabulary logits: see
    ``topk_logits`` for the memory saved.

    With a bounded replay policy (``replay.policy`` other than ``uniform``) DER works on
    the policy's buffer instead (``task_start``): at each task boundary the store keeps
    exactly the buffer's rows, the finished task's rows getting the logits of the model
    that has just trained on them (the end-of-task model: the buffer is chosen at the
    boundary), so every replayed row has its logits. ``rows_per_domain`` is then unused.
    """

    def __init__(self, config, placement, train_sources):
        der = config.method.der
        mcfg, mesh = placement.mcfg, placement.mesh
        self.on_buffer = config.replay.policy != "uniform"
        capacity = config.replay.buffer_rows if self.on_buffer else der.rows_per_domain
        self.store = DERStore(der.k, capacity, seed=config.seed)
        self.chunk = config.eval.batch
        self.sources, self.placement = list(train_sources), placement
        self.k, self.seq_len = int(der.k), config.seq_len
        rep = sharding_lib.replicated(mesh)

        def topk(params, tokens, seg):
            logits = model_lib.forward(mcfg, params, tokens[:, :-1], seg[:, :-1])
            return topk_logits(logits, self.k)

        self._topk = jax.jit(topk, in_shardings=(placement.shardings.params, rep, rep),
                             out_shardings=rep)

    def _store_rows(self, params, domain: int, rows: np.ndarray) -> int:
        """Records the top-k logits of ``rows`` of ``domain`` (unique, not stored yet)."""
        added = 0
        for lo in range(0, rows.size, self.chunk):
            part = rows[lo:lo + self.chunk]
            pad = 1 << int(np.ceil(np.log2(part.size)))  # bucketed sizes: few compiles
            padded = np.concatenate([part, np.full(pad - part.size, part[0])])
            tokens, segs = self.sources[domain].read(padded)
            with self.placement.activate():
                values, indices = jax.device_get(self._topk(params, tokens, segs))
            added += self.store.add(domain, part, values[:part.size], indices[:part.size])
        return added

    def before_step(self, params, task: int, idx) -> int:
        """Store top-k logits of this batch's current-task rows that the store wants (per
        domain the rows come from: a mixture task has several, ``task`` unused)."""
        del task
        if self.on_buffer:
            return 0
        cur, added = ~idx.is_replay, 0
        for d in np.unique(idx.domain[cur]).tolist():
            rows = idx.row[cur & (idx.domain == d)]
            want = self.store.wants(d, rows, len(self.sources[d]))
            added += self._store_rows(params, d, np.unique(rows[want]))
        return added

    def task_start(self, params, task: int, pool, starts) -> None:
        """The store holds exactly the rows of ``pool`` (a bounded policy's buffer): rows
        that left it are dropped, rows that entered it are recorded with ``params``."""
        del task
        if pool is None:
            return
        ids = np.unique(pool.all_rows())
        owner = np.searchsorted(starts, ids, side="right") - 1
        for d in range(len(starts) - 1):
            rows = ids[owner == d] - starts[d]
            self.store.retain(d, rows)
            if rows.size:
                self._store_rows(params, d, rows[~self.store.has(d, rows)])

    def extras(self, task: int, step: int, idx) -> dict:
        """Stored logits of the replayed rows of a batch share (zeros where none)."""
        del task, step
        valid = self.store.has(idx.domain, idx.row) & idx.is_replay
        n = len(idx.row)
        values = np.zeros((n, self.seq_len, self.k), np.float32)
        indices = np.zeros((n, self.seq_len, self.k), np.int32)
        if valid.any():
            values[valid], indices[valid] = self.store.get(idx.domain[valid], idx.row[valid])
        return {"der_values": values, "der_indices": indices,
                "der_valid": valid.astype(np.int32)}

    def to_arrays(self) -> dict:
        return self.store.to_arrays()

    def load_arrays(self, arrays: dict) -> None:
        self.store = DERStore.from_arrays(arrays)


def _replay_loss(config):
    weight = config.method.der.weight

    def term(logits, batch, mask, teacher_logits):
        del teacher_logits
        der_mask = mask * batch["der_valid"].astype(jnp.float32)[:, None]
        se, _ = der_loss(logits, batch["der_values"], batch["der_indices"], der_mask)
        return weight * se, "der", se

    return term


def _check(config):
    d, r = config.method.der, config.replay
    if not (1 <= d.k <= config.model.vocab_size and d.rows_per_domain >= 1):
        raise ValueError(f"method.der.k={d.k} must be in [1, vocab_size] and rows_per_domain "
                         f"={d.rows_per_domain} >= 1")
    if r.get("sources") and r.policy == "uniform":
        raise ValueError(
            "DER with replay.sources and replay.policy='uniform' would replay source rows "
            "that have no stored logits; use a bounded policy (e.g. replay.policy=reservoir "
            "with replay.buffer_rows), whose buffer rows get the start model's logits")
    names = policy_names(config)
    if r.policy != "uniform" and ("resample" in names or "uniform" in names
                                  or ("domains" in names and not r.buffer_rows)):
        raise ValueError(
            f"DER with replay.policy={r.policy!r}: DER keeps the logits of the buffer's rows, "
            "and this policy replays rows from outside any buffer; use a bounded policy "
            "(reservoir, domains with buffer_rows, curriculum, craig, grad_match)")


METHOD = Method(name="der", defaults={"weight": 0.0, "k": 32, "rows_per_domain": 1024},
                replay_loss=_replay_loss, memory=DERRecorder,
                active=lambda c: c.method.der.weight > 0, check=_check)

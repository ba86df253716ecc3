"""Distillation terms on replayed rows: logit KD from a teacher, and Dark Experience Replay.

Two ways to keep the model's outputs on old data close to what they were:

- ``kl_distill_loss``: KL from a frozen teacher snapshot (taken at the task boundary) to the
  student, on temperature-softened distributions (Hinton et al. 2015, "Distilling the
  Knowledge in a Neural Network"). Costs a teacher forward per replayed row and one copy of
  the parameters.
- Dark Experience Replay (Buzzega et al. 2020, "Dark Experience for General Continual
  Learning: a Strong, Simple Baseline"): store the model's logits on a row when the row is
  first trained on, and later penalise the distance between the current logits and the
  stored ones when the row is replayed. No teacher forward; the cost is host memory, which
  ``topk_logits`` cuts by keeping only the top-k logits per token, and ``DERStore`` holds.

Both loss functions return ``(sum over masked tokens, number of masked tokens)``, like the
train step's loss sums, so they add across microbatches and devices and are normalised
once (e.g. by the replayed token count).
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax.replay.permutation import feistel_permute


# ---------------------------------------------------------------------------------------
# Teacher distillation


def kl_distill_loss(student_logits_BLV, teacher_logits_BLV, mask_BL, temperature: float = 1.0):
    """(sum over masked tokens of T^2 * KL(p_T || q_T), masked token count), float32.

    ``p_T = softmax(teacher / T)``, ``q_T = softmax(student / T)``, per token, computed with
    log-softmax in float32 (stable for any logit scale). The T^2 factor is Hinton et al.
    2015's: the soft-target gradient ``d KL / d student = (q_T - p_T) / T`` shrinks like
    1/T^2 as T grows (for large T, ``q_T - p_T`` is ~ (logit difference) / (V T)), so
    multiplying by T^2 keeps its magnitude roughly independent of T. The gradient of the
    returned sum w.r.t. a token's student logits is ``T * (q_T - p_T)``. No gradient flows
    into the teacher. Teacher tokens of probability 0 (logit -inf) contribute 0.
    """
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    log_q = jax.nn.log_softmax(student_logits_BLV.astype(jnp.float32) / t, axis=-1)
    log_p = jax.nn.log_softmax(
        jax.lax.stop_gradient(teacher_logits_BLV).astype(jnp.float32) / t, axis=-1)
    p = jnp.exp(log_p)
    kl_BL = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)
    mask = mask_BL.astype(jnp.float32)
    return (t * t) * jnp.sum(kl_BL * mask), jnp.sum(mask)


# ---------------------------------------------------------------------------------------
# Dark Experience Replay


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
        digest = hashlib.blake2b(f"{self.seed}/der/{int(domain)}".encode(),
                                 digest_size=48).digest()
        keys = np.frombuffer(digest, dtype=np.uint64).copy()
        n = min(self.rows_per_domain, int(num_rows))
        return np.sort(feistel_permute(np.arange(n), int(num_rows), keys))

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


"""Continual-learning metrics in loss terms: pure functions of the loss matrix.

R[i][j] is the validation loss on the domain of task j after training task i (T tasks, so
R is T x T); b[j] is the loss of the randomly initialised model on domain j. Lower loss is
better, so signs are chosen to read naturally:

- learned loss (plasticity): R[j][j], mean over j.
- retained loss: mean_j R[T-1][j], the final model on every domain.
- forgetting (Chaudhry et al. 2018, "Riemannian Walk"), loss terms:
  f_j = R[T-1][j] - min_{l < T-1} R[l][j] for j < T-1, averaged; > 0 means forgotten.
- BWT (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory"), loss terms:
  mean_{i < T-1} (R[i][i] - R[T-1][i]); > 0 means later tasks improved earlier ones.
- FWT: mean_{i >= 1} (b[i] - R[i-1][i]); > 0 means earlier tasks helped before training on i.
- last-step forgetting: mean_{j < T-1} (R[T-1][j] - R[j][j]), the loss gained on domain j
  between the end of its own task and the end of the run: forgetting measured against the
  model right after each task instead of the best earlier one. It is exactly -BWT (same
  terms, opposite sign), reported so that both conventions can be read off directly; it
  differs from Chaudhry's f_j when a domain's best loss before the last task was not the
  one at the end of its own task (e.g. it kept improving during the next task).
- area under the loss curve (``curve_area``): for each domain, the trapezoid integral of its
  validation loss over the evaluated steps divided by the step span, i.e. the mean loss over
  the whole run. It sees transient forgetting that recovers before a task ends, which the
  end-of-task matrix R cannot.

``metrics_from_results`` recomputes all of the above from a ``results.json`` dictionary.

Compute accounting (``training_flops``, ``with_flops``) uses the same count as
``scripts/benchmark.py``: ``LlamaConfig.flops_per_token(seq_len)`` training FLOPs per token
(forward + backward, PaLM's counting; Chowdhery et al. 2022, appendix B) times the tokens
trained on, replayed tokens included.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"loss matrix must be square [tasks, tasks], got shape {R.shape}")
    return R


def learned_loss(R) -> float:
    return float(np.mean(np.diag(_matrix(R))))


def retained_loss(R) -> float:
    return float(np.mean(_matrix(R)[-1]))


def forgetting(R) -> float | None:
    R = _matrix(R)
    T = R.shape[0]
    if T < 2:
        return None
    f = [R[-1, j] - R[: T - 1, j].min() for j in range(T - 1)]
    return float(np.mean(f))


def backward_transfer(R) -> float | None:
    R = _matrix(R)
    T = R.shape[0]
    if T < 2:
        return None
    return float(np.mean([R[i, i] - R[-1, i] for i in range(T - 1)]))


def forward_transfer(R, b: Sequence[float]) -> float | None:
    R = _matrix(R)
    T = R.shape[0]
    b = np.asarray(b, dtype=np.float64)
    if T < 2:
        return None
    return float(np.mean([b[i] - R[i - 1, i] for i in range(1, T)]))


def forgetting_last(R) -> float | None:
    """mean_{j < T-1} (R[T-1][j] - R[j][j]): loss gained since the end of each domain's task."""
    R = _matrix(R)
    T = R.shape[0]
    if T < 2:
        return None
    return float(np.mean([R[-1, j] - R[j, j] for j in range(T - 1)]))


def curve_area(eval_curve: Sequence[dict], domains: Sequence[str] | None = None
               ) -> dict[str, float]:
    """Mean validation loss of each domain over the run: trapezoid area / step span.

    ``eval_curve`` is ``results["eval_curve"]``: ``[{"step": s, "losses": {domain: loss}}]``.
    Points are sorted by step; a domain missing at some point uses the points where it is
    present. A domain evaluated at a single step (or at one repeated step) gets that loss.
    """
    if domains is None:
        domains = sorted({d for e in eval_curve for d in e["losses"]})
    out = {}
    for d in domains:
        pts = sorted((float(e["step"]), float(e["losses"][d])) for e in eval_curve
                     if d in e["losses"])
        if not pts:
            raise ValueError(f"domain {d!r} has no point in eval_curve")
        steps = np.array([p[0] for p in pts])
        losses = np.array([p[1] for p in pts])
        span = steps[-1] - steps[0]
        if span == 0:
            out[d] = float(losses.mean())
        else:
            area = np.sum((steps[1:] - steps[:-1]) * (losses[1:] + losses[:-1]) / 2.0)
            out[d] = float(area / span)
    return out


def summary(R, b: Sequence[float] | None = None) -> dict:
    """All metrics of a run, with a perplexity ``*_ppl`` (exp of the loss) beside every
    ``*_loss`` entry. Differences of losses (forgetting, BWT, FWT) have no perplexity."""
    out = {"learned_loss": learned_loss(R), "retained_loss": retained_loss(R),
           "forgetting": forgetting(R), "forgetting_last": forgetting_last(R),
           "bwt": backward_transfer(R)}
    if b is not None:
        out["fwt"] = forward_transfer(R, b)
        out["init_loss"] = float(np.mean(np.asarray(b, dtype=np.float64)))
    for key in [k for k in out if k.endswith("_loss")]:
        out[key[: -len("_loss")] + "_ppl"] = _ppl(out[key])
    return out


def loss_matrix_columns(results: dict) -> list[str]:
    """The domain of each loss-matrix column: the configured tasks' domains in order (a
    joint run trains one "joint" task but is still evaluated per domain), else ``tasks``."""
    tasks = (results.get("config") or {}).get("tasks")
    if tasks and all(isinstance(t, dict) and "domain" in t for t in tasks):
        return [t["domain"] for t in tasks]
    return list(results["tasks"])


def metrics_from_results(results: dict) -> dict:
    """``summary`` of a results.json dict plus ``curve_area`` (mean loss per domain over the
    run) and its mean over domains, ``curve_area_mean``.

    A run stopped before its last task (rows = the first tasks) gets the metrics of its
    finished square part; a joint run (one row over all domains) gets only the retained
    loss, since learned loss, forgetting and transfer need a task sequence.
    """
    R = np.asarray(results["loss_matrix"], dtype=np.float64)
    if R.ndim != 2 or R.shape[0] == 0:
        raise ValueError("results have an empty loss_matrix: no task finished")
    cols = loss_matrix_columns(results)
    n = R.shape[0]
    init = results.get("init_losses") or {}
    b = [init[c] for c in cols] if all(c in init for c in cols) else None
    if n == R.shape[1] or list(results["tasks"])[:n] == cols[:n]:
        out = summary(R[:, :n], None if b is None else b[:n])
    else:
        retained = float(np.mean(R[-1]))
        out = {"retained_loss": retained, "retained_ppl": _ppl(retained)}
    area = curve_area(results["eval_curve"], results.get("domains"))
    out["curve_area"] = area
    out["curve_area_mean"] = float(np.mean(list(area.values())))
    return out


def _ppl(loss: float) -> float:
    """exp(loss), inf rather than OverflowError for a diverged run."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


# ----------------------------------------------------------------------------- compute


def training_flops(model_cfg, tokens: int, seq_len: int) -> float:
    """Training FLOPs of ``tokens`` tokens: ``tokens * model_cfg.flops_per_token(seq_len)``.

    ``model_cfg`` is a ``cpt_jax.model.LlamaConfig``. Counts one forward and one backward
    pass per token (the number ``scripts/benchmark.py`` uses for MFU); evaluation and the
    extra passes some methods add (a distillation teacher's forward, A-GEM's replay
    gradient, EWC's Fisher estimate) are not included.
    """
    return float(tokens) * float(model_cfg.flops_per_token(seq_len))


def with_flops(task_stats: Sequence[dict], model_cfg, seq_len: int) -> tuple[list, dict]:
    """``results["task_stats"]`` with ``flops`` added to each entry, and the run's totals.

    Each entry needs ``new_tokens`` and ``replay_tokens``. Returns ``(entries, totals)``:
    new dicts (the input is not modified) and ``{"new_tokens", "replay_tokens", "tokens",
    "flops"}`` over all tasks.
    """
    entries = []
    for t in task_stats:
        tokens = int(t["new_tokens"]) + int(t["replay_tokens"])
        entries.append({**t, "flops": training_flops(model_cfg, tokens, seq_len)})
    totals = {
        "new_tokens": sum(int(t["new_tokens"]) for t in entries),
        "replay_tokens": sum(int(t["replay_tokens"]) for t in entries),
    }
    totals["tokens"] = totals["new_tokens"] + totals["replay_tokens"]
    totals["flops"] = float(sum(t["flops"] for t in entries))
    return entries, totals

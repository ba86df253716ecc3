"""Continual-learning metrics in loss terms: pure functions of the loss matrix.

Every definition used by results.json ``metrics`` and by the run report (``report.py``) is
here. R[i][j] is the validation loss on the domain of task j after training task i (tasks
0..T-1, so R is T x T). Lower loss is better; each metric's sign is chosen so that the
reading given after it holds.

- learned loss (plasticity, ``learned_loss``): mean_j R[j][j], each domain right after its
  own task.
- retained loss (``retained_loss``): mean_{j < T-1} R[T-1][j], the final model on the
  EARLIER domains only (the last task's own domain measures plasticity, not retention);
  None when T == 1.
- final loss over all domains (``final_loss_all``): mean_j R[T-1][j], the final model on
  every domain, the last one included.
- forgetting (``forgetting``; Chaudhry et al. 2018, "Riemannian Walk for Incremental
  Learning", in loss terms): f_j = R[T-1][j] - min_{j <= l < T-1} R[l][j], mean over
  j < T-1; > 0 means forgotten. Only rows from the end of task j on count as domain j's best
  loss: a lower loss before domain j was trained (transfer from earlier tasks) is not
  something that was learned and then lost.
- BWT (``backward_transfer``; Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory", in loss
  terms): mean_{i < T-1} (R[i][i] - R[T-1][i]); > 0 means later tasks improved earlier ones.
- FWT (``forward_transfer``; Lopez-Paz & Ranzato 2017, in loss terms):
  mean_{i >= 1} (b[i] - R[i-1][i]), where b[i] is the loss of a RANDOMLY INITIALISED model on
  domain i (results.json ``init_losses_random``), also when the run starts from a
  pre-trained checkpoint; > 0 means the model was better on domain i before training on it
  than a random model (for a pre-trained start, pre-training is credited as well).
- last-step forgetting (``forgetting_last``): mean_{j < T-1} (R[T-1][j] - R[j][j]), the loss
  gained on domain j between the end of its own task and the end of the run. It is exactly
  -BWT, reported so that both conventions can be read off directly; it differs from
  Chaudhry's f_j when domain j's best loss was reached after its own task (it kept improving
  during a later one).
- area under the loss curve (``curve_area``): for each domain, the trapezoid integral of its
  validation loss over the evaluated steps divided by the step span, i.e. the mean loss over
  the whole run. It sees transient forgetting that recovers before a task ends, which the
  end-of-task matrix R cannot.
- start losses: ``init_loss_random`` = mean_j b[j] (the random-init model, what FWT uses);
  ``init_loss_start`` = mean over domains of results.json ``init_losses``, the losses of the
  model the run starts from (equal to ``init_loss_random`` for a fresh init, the pre-trained
  model's losses otherwise).

``summary`` puts a perplexity exp(loss) beside every loss, named with ``loss`` replaced by
``ppl``: ``learned_ppl``, ``retained_ppl``, ``final_ppl_all``, ``init_ppl_random``,
``init_ppl_start``. Differences of losses (forgetting, BWT, FWT) have none. An undefined
metric (T == 1, or b unknown) is None, and so is its perplexity.

``metrics_from_results`` recomputes all of the above from a ``results.json`` dictionary:

- b comes from ``init_losses_random``. Results written before that key existed have only
  ``init_losses``; those are used as b when the run was a fresh init (``config.init.hf``,
  ``.orbax`` and ``.checkpoint`` all empty or absent), else FWT and ``init_loss_random`` are
  None.
- a joint run (one task over the union of all data) has one row of losses over the domains
  of the configured task order: its retained loss is the mean over all but the last
  configured task's domain, the domains a sequential run's retained loss averages, so the
  two compare; ``final_loss_all`` is the mean of the whole row. Learned loss, forgetting,
  BWT and FWT need a task sequence and are absent.

Compute accounting (``training_flops``, ``with_flops``) uses the same count as
``scripts/benchmark.py``: ``LlamaConfig.flops_per_token(seq_len)`` training FLOPs per token
(forward + backward, PaLM's counting; Chowdhery et al. 2022, appendix B) times the tokens
trained on, replayed tokens included.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from cpt_jax.data.recipe import Recipe

INIT_KEYS = ("hf", "orbax", "checkpoint")  # config.init sources of a pre-trained start


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"loss matrix must be square [tasks, tasks], got shape {R.shape}")
    return R


def learned_loss(R) -> float:
    """Plasticity: mean_j R[j][j]."""
    return float(np.mean(np.diag(_matrix(R))))


def retained_loss(R) -> float | None:
    """mean_{j < T-1} R[T-1][j]: the final model on the earlier domains; None when T == 1."""
    R = _matrix(R)
    return None if R.shape[0] < 2 else float(np.mean(R[-1, :-1]))


def final_loss_all(R) -> float:
    """mean_j R[T-1][j]: the final model on every domain, the last task's included."""
    return float(np.mean(_matrix(R)[-1]))


def forgetting(R) -> float | None:
    """Chaudhry et al. 2018 in loss terms: mean_{j < T-1} of
    R[T-1][j] - min_{j <= l < T-1} R[l][j]; None when T == 1."""
    R = _matrix(R)
    T = R.shape[0]
    if T < 2:
        return None
    return float(np.mean([R[-1, j] - R[j: T - 1, j].min() for j in range(T - 1)]))


def backward_transfer(R) -> float | None:
    """BWT, Lopez-Paz & Ranzato 2017 in loss terms: mean_{i < T-1} (R[i][i] - R[T-1][i])."""
    R = _matrix(R)
    T = R.shape[0]
    if T < 2:
        return None
    return float(np.mean([R[i, i] - R[-1, i] for i in range(T - 1)]))


def forward_transfer(R, b: Sequence[float]) -> float | None:
    """FWT, Lopez-Paz & Ranzato 2017 in loss terms: mean_{i >= 1} (b[i] - R[i-1][i]), with
    b[i] the loss of a randomly initialised model on domain i; None when T == 1."""
    R = _matrix(R)
    T = R.shape[0]
    b = np.asarray(b, dtype=np.float64)
    if b.shape != (T,):
        raise ValueError(f"b must hold one loss per domain ({T}), got shape {b.shape}")
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


def _mean(xs) -> float | None:
    return None if xs is None else float(np.mean(np.asarray(xs, dtype=np.float64)))


def _with_ppl(out: dict) -> dict:
    """``out`` with a perplexity beside every loss: key with ``loss`` replaced by ``ppl``."""
    for key in [k for k in out if "loss" in k.split("_")]:
        out[key.replace("loss", "ppl", 1)] = _ppl(out[key])
    return out


def summary(R, b: Sequence[float] | None = None, start: Sequence[float] | None = None
            ) -> dict:
    """All matrix metrics of a sequential run, with perplexities (see the module docstring).

    ``b``: per-domain losses of a randomly initialised model (FWT, ``init_loss_random``);
    ``start``: per-domain losses of the model the run started from (``init_loss_start``).
    Either may be None (unknown), and then so are the metrics that need it.
    """
    return _with_ppl({
        "learned_loss": learned_loss(R), "retained_loss": retained_loss(R),
        "final_loss_all": final_loss_all(R), "forgetting": forgetting(R),
        "forgetting_last": forgetting_last(R), "bwt": backward_transfer(R),
        "fwt": None if b is None else forward_transfer(R, b),
        "init_loss_random": _mean(b), "init_loss_start": _mean(start),
    })


def recipe_metrics(R, columns: Sequence[str], tasks: Sequence[dict],
                   sources: Sequence[str] = (), start: Sequence[float] | None = None,
                   b: Sequence[float] | None = None) -> dict:
    """The metrics of ``summary`` for a run whose loss matrix has a column per domain:
    task domains (a mixture task's components each a column), replay sources and held-out
    domains (DESIGN.md, "Domains that are not a task's").

    Args:
      R: [rows, D] losses after each finished task (rows <= len(tasks)), columns in
        ``columns`` order.
      tasks: per task {domain: weight}, weights summing to 1.
      sources: replay sources: trained "before task 0", so ``start`` (the losses of the
        model the run starts from, [D]) is their own row and their best-so-far candidate.
      b: [D] losses of a randomly initialised model (FWT), or None.

    With T finished tasks, the EARLIER domains are the sources and the components of tasks
    < T-1. A task's own loss is the weighted mean of its components: learned loss is its
    mean over tasks, FWT uses it too. Retained loss, forgetting (Chaudhry et al. 2018: the
    final loss minus the best loss from the row where the domain was trained on, the start
    row for a source) and BWT are means over the earlier domains, one term per column.
    ``final_loss_all`` and the start means are over task and source columns; held-out
    domains get ``heldout_change`` instead: final minus start, per domain and its mean.
    """
    R = np.asarray(R, dtype=np.float64)
    col = {c: i for i, c in enumerate(columns)}
    T = R.shape[0]
    if R.ndim != 2 or R.shape[1] != len(columns) or not 1 <= T <= len(tasks):
        raise ValueError(f"loss matrix of shape {R.shape} does not fit {len(columns)} columns "
                         f"and {len(tasks)} tasks")
    start = None if start is None else np.asarray(start, np.float64)
    last = R[-1]

    def own(i, row):  # task i's weighted loss in ``row``
        return sum(w * row[col[c]] for c, w in tasks[i].items())

    trained_at = {c: -1 for c in sources}  # row where each earlier domain was trained
    for i in range(T - 1):
        trained_at.update({c: i for c in tasks[i]})
    forget, back = [], []
    for c, i in trained_at.items():
        j = col[c]
        rows = list(R[max(i, 0):T - 1, j])
        if i < 0 and start is not None:
            rows.append(start[j])
        if rows:
            forget.append(last[j] - min(rows))
        if i >= 0:
            back.append(R[i, j] - last[j])
        elif start is not None:
            back.append(start[j] - last[j])
    scored = [col[c] for c in columns if c in sources or any(c in t for t in tasks[:T])]
    heldout = [c for c in columns if c not in sources and not any(c in t for t in tasks)]
    out = {
        "learned_loss": float(np.mean([own(i, R[i]) for i in range(T)])),
        "retained_loss": float(np.mean([last[col[c]] for c in trained_at]))
        if trained_at else None,
        "final_loss_all": float(np.mean(last[scored])),
        "forgetting": float(np.mean(forget)) if forget else None,
        "forgetting_last": -float(np.mean(back)) if back else None,
        "bwt": float(np.mean(back)) if back else None,
        "fwt": None if b is None or T < 2 else float(np.mean(
            [own(i, np.asarray(b, np.float64)) - own(i, R[i - 1]) for i in range(1, T)])),
        "init_loss_random": None if b is None else float(np.mean(np.asarray(b)[scored])),
        "init_loss_start": None if start is None else float(np.mean(start[scored])),
    }
    out = _with_ppl(out)
    if heldout and start is not None:
        change = {c: float(last[col[c]] - start[col[c]]) for c in heldout}
        out["heldout_change"] = {"mean": float(np.mean(list(change.values()))),
                                 "per_domain": change}
    return out


def _recipe(results: dict):
    """The run's data recipe when its loss matrix has a column per domain (``columns``) and
    it trained a task sequence (not joint), else None (the square-matrix metrics apply)."""
    config = results.get("config") or {}
    if not results.get("columns") or config.get("joint") or not config.get("tasks"):
        return None
    return Recipe.of_config(config)


def loss_matrix_columns(results: dict) -> list[str]:
    """The domain of each loss-matrix column: ``columns`` (every domain, in data.domains
    order) when present; before that key, the configured tasks' domains in order (a joint
    run trains one "joint" task but is still evaluated per domain), else ``tasks``."""
    if results.get("columns"):
        return list(results["columns"])
    tasks = (results.get("config") or {}).get("tasks")
    if tasks and all(isinstance(t, dict) and "domain" in t for t in tasks):
        return [t["domain"] for t in tasks]
    return list(results["tasks"])


COLUMN_MARKS = {"task": "", "replay_source": " (replay source)", "heldout": " (held out)"}


def column_labels(results: dict) -> list[str]:
    """The loss-matrix columns with their kind marked: task domains plain, replay sources
    "(replay source)", held-out domains "(held out)" (results.json ``column_kinds``)."""
    kinds = results.get("column_kinds") or {}
    return [c + COLUMN_MARKS.get(kinds.get(c, "task"), "") for c in loss_matrix_columns(results)]


def random_init_losses(results: dict) -> dict | None:
    """{domain: loss} of a randomly initialised model for FWT: ``init_losses_random``, or,
    in results written before that key, ``init_losses`` if the run was a fresh init (no
    ``config.init`` source); None when unknown (an old run from a pre-trained start)."""
    if results.get("init_losses_random"):
        return results["init_losses_random"]
    init = (results.get("config") or {}).get("init") or {}
    if any(init.get(k) for k in INIT_KEYS):
        return None
    return results.get("init_losses") or None


def metrics_from_results(results: dict) -> dict:
    """``summary`` of a results.json dict plus ``curve_area`` (mean loss per domain over the
    run) and its mean over domains, ``curve_area_mean``.

    b (FWT, ``init_loss_random``) is ``random_init_losses(results)``; ``init_loss_start``
    comes from ``init_losses``. A run stopped before its last task (rows = the first tasks)
    gets the metrics of its finished square part. A joint run (one row over all domains)
    gets ``retained_loss`` (all but the last configured task's domain), ``final_loss_all``,
    the start losses and their perplexities, since learned loss, forgetting and transfer
    need a task sequence.
    """
    R = np.asarray(results["loss_matrix"], dtype=np.float64)
    if R.ndim != 2 or R.shape[0] == 0:
        raise ValueError("results have an empty loss_matrix: no task finished")
    cols = loss_matrix_columns(results)
    n = R.shape[0]

    def per_column(losses):
        return [losses[c] for c in cols] if losses and all(c in losses for c in cols) else None

    b, start = per_column(random_init_losses(results)), per_column(results.get("init_losses"))
    recipe = _recipe(results)
    if recipe is not None:
        out = recipe_metrics(R, cols, recipe.tasks, recipe.sources, start, b)
    elif n == R.shape[1] or list(results["tasks"])[:n] == cols[:n]:
        out = summary(R[:, :n], None if b is None else b[:n],
                      None if start is None else start[:n])
    else:
        row = R[-1]
        out = _with_ppl({
            "retained_loss": float(np.mean(row[:-1])) if len(row) > 1 else None,
            "final_loss_all": float(np.mean(row)),
            "init_loss_random": _mean(b), "init_loss_start": _mean(start)})
    area = curve_area(results["eval_curve"], results.get("domains"))
    out["curve_area"] = area
    out["curve_area_mean"] = float(np.mean(list(area.values())))
    return out


def _ppl(loss: float | None) -> float | None:
    """exp(loss), inf rather than OverflowError for a diverged run; None for None."""
    if loss is None:
        return None
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

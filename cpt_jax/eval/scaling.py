"""Scaling analysis of a sweep (``scripts/sweep.py``): is replay a better use of compute
than a larger model? Pure functions over finished points; ``scripts/analyze_sweep.py`` and
``notebooks/scaling.ipynb`` do the reading and drawing.

Abbes et al. 2025 find that small replay rates are a better use of training compute than a
larger model, and that high replay rates are not. Here that is tested on a sweep's cells
(one cell per combination of grid values other than the seed):

- ``point_rows``: per finished point its grid values, training FLOPs, non-embedding
  parameters and the metrics of ``cpt_jax.eval.metrics`` (learned, retained, forgetting);
- ``aggregate``: per cell the mean and standard error over seeds (std with ddof 1 / sqrt n);
- ``pareto_front``: cells that no other cell beats on both learned and retained loss;
- ``fit_power_law``: L(C) = a (C / C0)^-b + c by least squares (variable projection over b,
  then Gauss-Newton standard errors from the Jacobian), per curve of ``curves``: one per
  replay rate (across model sizes) and one per model size (across replay rates);
- ``replay_vs_size``: for each model size m and consecutive replay rates r -> r', the cell
  (m, r') against the next size's path at the same FLOPs. Going from (m, r) to (m+1, r) is
  the model-size path; its loss at the FLOPs of (m, r') is interpolated linearly in
  log FLOPs between the two measured cells. Replay "beats the next model size" when the
  cell (m, r') is below that interpolation: it lowers the loss more per unit of log
  compute. When the sweep matched FLOPs (``--match flops``), the two cells spend the same
  FLOPs and are compared directly. ``answer`` states the outcome in words.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from cpt_jax.eval import metrics as metrics_lib
from cpt_jax.eval import run_info

METRICS = ("learned_loss", "retained_loss", "forgetting", "final_loss_all")
SIZE_KEY, RATE_KEY, SEED_KEY = "model", "replay.rate", "seed"
MATCHED_LOG_TOL = 0.02  # FLOPs within 2% count as matched


def size_label(values: dict) -> str | None:
    """The model-size label of a point: its ``model`` preset, else its ``model.*`` values."""
    if SIZE_KEY in values:
        return str(values[SIZE_KEY])
    parts = [f"{k[len('model.'):]}={v}" for k, v in values.items() if k.startswith("model.")]
    return ",".join(parts) or None


def point_rows(points: Sequence[dict], results: dict) -> list[dict]:
    """One row per point of ``points`` (index.json entries) whose results are in
    ``results`` (name -> results.json content): grid values, ``size``, ``rate``, ``seed``,
    ``flops``, ``params`` (non-embedding) and the metrics."""
    rows = []
    for p in points:
        res = results.get(p["name"])
        if res is None:
            continue
        values = dict(p["values"])
        cfg = run_info.model_config(res)
        rate = run_info.replay_rate_done(res)
        m = metrics_lib.metrics_from_results(res)
        rows.append({
            "name": p["name"], "values": values, "size": size_label(values),
            "rate": float(values.get(RATE_KEY, rate or 0.0)),
            "seed": values.get(SEED_KEY, (res.get("config") or {}).get("seed")),
            "flops": run_info.training_flops_of(res),
            "params": cfg.num_params(include_embedding=False) if cfg else None,
            **{k: m.get(k) for k in METRICS}})
    return rows


def cell_key(row: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in row["values"].items() if k != SEED_KEY))


def mean_se(xs: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (None for no values; se None for one value)."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    if len(xs) == 1:
        return xs[0], None
    return float(np.mean(xs)), float(np.std(xs, ddof=1) / math.sqrt(len(xs)))


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """Cells: rows grouped by every grid value but the seed, with ``<metric>`` (mean),
    ``<metric>_se``, ``n``, mean ``flops`` and the shared ``size``, ``rate``, ``params``;
    ordered by (size by params, rate)."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(cell_key(r), []).append(r)
    cells = []
    for key, rs in groups.items():
        cell = {"values": dict(key), "size": rs[0]["size"], "rate": rs[0]["rate"],
                "params": rs[0]["params"], "n": len(rs),
                "seeds": [r["seed"] for r in rs],
                "flops": mean_se([r["flops"] for r in rs])[0]}
        for k in METRICS:
            cell[k], cell[f"{k}_se"] = mean_se([r[k] for r in rs])
        cells.append(cell)
    return sorted(cells, key=lambda c: (c["params"] or 0, str(c["size"]), c["rate"],
                                        sorted(c["values"].items())))


def pareto_front(cells: Sequence[dict], x: str = "learned_loss",
                 y: str = "retained_loss") -> list[int]:
    """Indices of the cells not dominated on (x, y), both lower-is-better: no other cell is
    at least as good on both and strictly better on one. Sorted by x."""
    pts = [(c[x], c[y]) for c in cells]
    front = []
    for i, (xi, yi) in enumerate(pts):
        if xi is None or yi is None:
            continue
        if not any(xj is not None and yj is not None and xj <= xi and yj <= yi
                   and (xj < xi or yj < yi) for j, (xj, yj) in enumerate(pts) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: pts[i])


def _reference_flops(C: np.ndarray) -> float:
    return float(10.0 ** round(float(np.mean(np.log10(C)))))


def _fit_given_b(x, L, b):
    """Least-squares (a, c) of L = a x^-b + c and its residual sum of squares, for each b
    of an array (the closed-form two-parameter regression on u = x^-b)."""
    u = x[None, :] ** -np.atleast_1d(b)[:, None]  # [nb, n]
    du, dL = u - u.mean(axis=1, keepdims=True), L - L.mean()
    a = (du @ dL) / np.maximum((du * du).sum(axis=1), 1e-300)
    c = L.mean() - a * u.mean(axis=1)
    rss = ((L[None, :] - a[:, None] * u - c[:, None]) ** 2).sum(axis=1)
    return a, c, rss


def fit_power_law(C: Sequence[float], L: Sequence[float], b_max: float = 4.0) -> dict | None:
    """Least-squares fit of L = a (C / C0)^-b + c, C0 a power of ten near the data.

    For each b the best (a, c) is a linear least-squares problem, so the fit is a 1-D
    search over b in (0, b_max] (a grid, then golden-section refinement) of the residual
    sum of squares. Standard errors: sqrt(diag(s^2 (J^T J)^-1)), J the Jacobian in
    (a, b, c) at the optimum and s^2 = RSS / (n - 3); None when n <= 3 (an exact fit).
    ``at_bound`` is True when the best b is the edge of the range (the data do not bend
    like a power law there). Returns None when fewer than three distinct C are given (the
    three constants are then not determined).
    """
    C, L = np.asarray(C, np.float64), np.asarray(L, np.float64)
    ok = np.isfinite(C) & np.isfinite(L) & (C > 0)
    C, L = C[ok], L[ok]
    if len(np.unique(C)) < 3:
        return None
    C0 = _reference_flops(C)
    x = C / C0
    grid = np.linspace(b_max / 2000, b_max, 2000)
    b0 = grid[int(np.argmin(_fit_given_b(x, L, grid)[2]))]
    lo, hi = max(grid[0], b0 - b_max / 2000), min(b_max, b0 + b_max / 2000)
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        m1, m2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if _fit_given_b(x, L, m1)[2][0] <= _fit_given_b(x, L, m2)[2][0]:
            hi = m2
        else:
            lo = m1
    b = float(lo + hi) / 2
    a, c, rss_b = (float(v[0]) for v in _fit_given_b(x, L, b))
    n = len(L)
    out = {"a": a, "b": b, "c": c, "C0": C0, "n": n, "rss": rss_b,
           "a_se": None, "b_se": None, "c_se": None,
           "at_bound": bool(b >= b_max * 0.999 or b <= 2 * grid[0])}
    if n > 3:
        J = np.stack([x ** -b, -a * x ** -b * np.log(x), np.ones_like(x)], axis=1)
        try:
            cov = rss_b / (n - 3) * np.linalg.inv(J.T @ J)
            out["a_se"], out["b_se"], out["c_se"] = (float(math.sqrt(max(v, 0.0)))
                                                     for v in np.diag(cov))
        except np.linalg.LinAlgError:
            pass
    return out


def power_law(fit: dict, C) -> np.ndarray:
    """The fitted curve at FLOPs ``C``."""
    return fit["a"] * (np.asarray(C, np.float64) / fit["C0"]) ** -fit["b"] + fit["c"]


def _other_values(values: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in values.items()
                        if k not in (SIZE_KEY, RATE_KEY, SEED_KEY) and not k.startswith("model.")))


def curves(cells: Sequence[dict], along: str) -> list[dict]:
    """Curves through the cells: ``along="size"`` gives one curve per replay rate (its
    cells across model sizes), ``along="rate"`` one per model size (across replay rates).
    Each curve: ``label``, ``cells`` (by FLOPs); other grid values split curves."""
    fixed = "rate" if along == "size" else "size"
    groups: dict[tuple, list] = {}
    for c in cells:
        groups.setdefault((_other_values(c["values"]), c[fixed]), []).append(c)
    out = []
    for (other, value), cs in groups.items():
        if len(cs) < 2:
            continue
        name = f"replay {value:g}" if fixed == "rate" else f"model {value}"
        extra = ", ".join(f"{k}={v}" for k, v in other)
        out.append({"label": f"{name} ({extra})" if extra else name, "fixed": fixed,
                    "value": value, "cells": sorted(cs, key=lambda c: c["flops"] or 0)})
    return out


def fit_curves(rows: Sequence[dict], cells: Sequence[dict],
               metric: str = "retained_loss") -> list[dict]:
    """A power-law fit of ``metric`` against FLOPs per curve (both kinds), on the seed-
    level rows of the curve's cells (replicates give the residual degrees of freedom)."""
    by_cell: dict[tuple, list] = {}
    for r in rows:
        by_cell.setdefault(cell_key(r), []).append(r)
    out = []
    for along in ("size", "rate"):
        for curve in curves(cells, along):
            rs = [r for c in curve["cells"]
                  for r in by_cell.get(tuple(sorted(c["values"].items())), [])]
            fit = fit_power_law([r["flops"] for r in rs], [r[metric] for r in rs])
            out.append({"curve": curve["label"], "across": along, "metric": metric,
                        "points": len(rs), "fit": fit})
    return out


def _cell(cells, size, rate, other):
    for c in cells:
        if c["size"] == size and c["rate"] == rate and _other_values(c["values"]) == other:
            return c
    return None


def replay_vs_size(cells: Sequence[dict], metric: str = "retained_loss") -> list[dict]:
    """For every model size m but the largest, every pair of consecutive replay rates
    r < r' and the other grid values: cell (m, r') against the model-size path from
    (m, r) to (m+1, r) at the FLOPs of (m, r') (see the module docstring). ``margin`` > 0
    means the replay step is the better use of compute; ``margin_se`` is its standard
    error from the cells' standard errors."""
    sizes = []
    for c in sorted(cells, key=lambda c: (c["params"] or 0)):
        if c["size"] not in sizes:
            sizes.append(c["size"])
    rates = sorted({c["rate"] for c in cells})
    others = sorted({_other_values(c["values"]) for c in cells})
    out = []
    for other in others:
        for r, r2 in zip(rates, rates[1:]):
            for m, m2 in zip(sizes, sizes[1:]):
                base, replay, bigger = (_cell(cells, m, r, other), _cell(cells, m, r2, other),
                                        _cell(cells, m2, r, other))
                if None in (base, replay, bigger) or None in (
                        base[metric], replay[metric], bigger[metric]):
                    continue
                lc = [math.log(x["flops"]) for x in (base, replay, bigger)]
                se = [x[f"{metric}_se"] or 0.0 for x in (base, replay, bigger)]
                matched = abs(lc[1] - lc[2]) < MATCHED_LOG_TOL
                if matched or lc[2] == lc[0]:
                    t, size_loss = 1.0, bigger[metric]
                else:
                    t = (lc[1] - lc[0]) / (lc[2] - lc[0])
                    size_loss = (1 - t) * base[metric] + t * bigger[metric]
                margin = size_loss - replay[metric]
                margin_se = math.sqrt((1 - t) ** 2 * se[0] ** 2 + t ** 2 * se[2] ** 2
                                      + se[1] ** 2)
                out.append({
                    "other": dict(other), "rate_from": r, "rate_to": r2,
                    "size_from": m, "size_to": m2, "metric": metric,
                    "matched": matched, "flops_base": base["flops"],
                    "flops_replay": replay["flops"], "flops_size": bigger["flops"],
                    "loss_base": base[metric], "loss_replay": replay[metric],
                    "loss_size": bigger[metric], "loss_size_at_replay_flops": size_loss,
                    "position": t, "margin": margin, "margin_se": margin_se,
                    "replay_wins": margin > 0,
                    "clear": margin_se > 0 and abs(margin) > 2 * margin_se})
    return out


def answer(comparisons: Sequence[dict]) -> str:
    """The paper's question answered in words from ``replay_vs_size``'s comparisons."""
    if not comparisons:
        return ("No answer: the sweep needs at least two model sizes (grid key `model`) and "
                "two replay rates (`replay.rate`) with finished points.")
    lines = []
    steps = sorted({(c["rate_from"], c["rate_to"]) for c in comparisons})
    for r, r2 in steps:
        cs = [c for c in comparisons if (c["rate_from"], c["rate_to"]) == (r, r2)]
        wins = sum(c["replay_wins"] for c in cs)
        clear = sum(c["clear"] for c in cs)
        metric = cs[0]["metric"].replace("_loss", " loss")
        if wins == len(cs):
            verdict = "yes"
        elif wins == 0:
            verdict = "no"
        else:
            verdict = "mixed"
        detail = "; ".join(
            f"{c['size_from']} -> {c['size_to']}: {metric} {c['loss_replay']:.3f} with replay "
            f"{r2:g} vs {c['loss_size_at_replay_flops']:.3f} on the model-size path at the "
            f"same {c['flops_replay']:.2g} FLOPs (margin {c['margin']:+.3f}"
            + (f" ± {c['margin_se']:.3f}" if c["margin_se"] else "") + ")"
            for c in cs)
        lines.append(
            f"- **Replay {r:g} -> {r2:g} vs the next model size, at matched FLOPs: {verdict}** "
            f"({wins} of {len(cs)} size pairs favour replay, {clear} of them by more than "
            f"two standard errors). {detail}.")
    return "\n".join(lines)

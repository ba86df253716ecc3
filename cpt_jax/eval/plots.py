"""Figures of a run, and of several runs side by side, written from results.json content.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``) and saved
through the Agg canvas: no display is needed and pyplot's global backend is never switched,
so calling these from a notebook leaves its inline plotting alone. Every file is written
under a temporary name and renamed, so a reader never sees a half-written image.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np

from cpt_jax.eval import scaling
from cpt_jax.eval.metrics import COLUMN_MARKS, column_labels


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """Write ``fig`` to ``path`` atomically (format from the extension, default png)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}.{ext}")
    try:
        fig.savefig(tmp, dpi=dpi, format=ext)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _figure(figsize):
    from matplotlib.figure import Figure
    return Figure(figsize=figsize, layout="constrained")


def _domain_points(curve: Sequence[dict], domain: str):
    pts = sorted((e["step"], e["losses"][domain]) for e in curve if domain in e["losses"])
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_loss_curves(results: dict, path: str) -> None:
    """Every domain's validation loss over training steps, task boundaries marked; replay
    sources and held-out domains dotted and so labelled."""
    fig = _figure((7, 4))
    ax = fig.add_subplot()
    kinds = results.get("column_kinds") or {}
    for domain in results["domains"]:
        xs, ys = _domain_points(results["eval_curve"], domain)
        ax.plot(xs, ys, marker=".", label=domain + COLUMN_MARKS.get(kinds.get(domain), ""),
                linestyle="-" if kinds.get(domain, "task") == "task" else ":")
    for b in results.get("task_boundaries", []):
        ax.axvline(b["end_step"], color="grey", linestyle="--", linewidth=0.8)
        ax.text(b["end_step"], ax.get_ylim()[1], f" end of {b['task']}", rotation=90,
                va="top", ha="right", fontsize=7, color="grey")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/token)")
    name = results.get("config", {}).get("name") or "continual pre-training"
    method = results.get("method")
    ax.set_title(f"{name}: {method}" if method else name)
    ax.legend()
    save_figure(fig, path)


def plot_runs_loss_curves(runs: Mapping[str, dict], path: str) -> None:
    """Loss curves of several runs, one subplot per domain, one line per run.

    ``runs`` maps a run label to its results dict. Each run's task boundaries are drawn as
    faint dashed lines in the run's colour.
    """
    domains: list[str] = []
    for res in runs.values():
        domains += [d for d in res["domains"] if d not in domains]
    n = max(len(domains), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure((4.2 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, domain in zip(axes, domains):
        for color, (label, res) in zip(colors, runs.items()):
            if domain not in res["domains"]:
                continue
            xs, ys = _domain_points(res["eval_curve"], domain)
            ax.plot(xs, ys, marker=".", color=color, label=label)
            for b in res.get("task_boundaries", [])[:-1]:
                ax.axvline(b["end_step"], color=color, linestyle="--", linewidth=0.7,
                           alpha=0.35)
        kind = next((r.get("column_kinds", {}).get(domain) for r in runs.values()
                     if r.get("column_kinds", {}).get(domain)), None)
        ax.set_title(f"domain: {domain}{COLUMN_MARKS.get(kind, '')}")
        ax.set_xlabel("training step")
        ax.set_ylabel("validation loss")
    for ax in axes[len(domains):]:
        ax.set_visible(False)
    if domains:
        axes[0].legend(fontsize=8)
    save_figure(fig, path)


def plot_loss_matrices(runs: Mapping[str, dict], path: str) -> None:
    """The loss matrix R[i][j] of each run as an annotated heatmap, one panel per run.

    Rows: the model after task i; columns: every evaluated domain, replay sources and
    held-out domains marked as such. All panels share one colour scale so that colours
    compare across runs.
    """
    mats = {label: res["loss_matrix"] for label, res in runs.items() if res["loss_matrix"]}
    values = [x for m in mats.values() for row in m for x in row]
    vmin, vmax = (min(values), max(values)) if values else (0.0, 1.0)
    n = max(len(mats), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure((4.0 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    image = None
    for ax, (label, m) in zip(axes, mats.items()):
        rows_of, cols_of = runs[label]["tasks"], column_labels(runs[label])
        image = ax.imshow(m, cmap="viridis_r", vmin=vmin, vmax=vmax, aspect="auto")
        mid = (vmin + vmax) / 2
        for i, row in enumerate(m):
            for j, x in enumerate(row):
                ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if x > mid else "black")
        ax.set_xticks(range(len(m[0])), cols_of[: len(m[0])], rotation=30, fontsize=8)
        ax.set_yticks(range(len(m)), [f"after {t}" for t in rows_of[: len(m)]], fontsize=8)
        ax.set_xlabel("evaluated domain")
        ax.set_title(label, fontsize=10)
    for ax in axes[len(mats):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes[: len(mats)]), label="validation loss", shrink=0.8)
    save_figure(fig, path)


def plot_retained_vs_flops(points: Sequence[tuple[str, float, float]], path: str) -> None:
    """Retained loss (final model on the earlier domains, ``metrics.retained_loss``) against
    training FLOPs.

    ``points``: ``(label, flops, retained_loss)`` per run; one labelled marker each. The
    FLOPs axis is logarithmic when the runs span more than a factor of 10.
    """
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    _labelled_points(ax, points)
    flops = [p[1] for p in points if p[1] and p[1] > 0]
    if flops and max(flops) / min(flops) > 10:
        ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("retained loss (lower is better)")
    ax.set_title("retained loss vs compute")
    save_figure(fig, path)


def plot_retained_vs_learned(points: Sequence[tuple[str, float, float]], path: str) -> None:
    """Retained loss (stability) against learned loss (plasticity), both from
    ``cpt_jax.eval.metrics``: lower-left is better.

    ``points``: ``(label, learned_loss, retained_loss)`` per run; one labelled marker each,
    e.g. one per meta-learning rate of a MER sweep.
    """
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    _labelled_points(ax, points)
    _learned_retained_axes(ax, "retained vs learned loss (lower-left is better)")
    save_figure(fig, path)


def _learned_retained_axes(ax, title: str) -> None:
    ax.set_xlabel("learned loss: mean R[j][j] (lower is better)")
    ax.set_ylabel("retained loss: earlier domains (lower is better)")
    ax.set_title(title)


def plot_retained_vs_buffer(curves: Mapping[str, Sequence[tuple[float, float]]],
                            references: Mapping[str, float], path: str) -> None:
    """Retained loss against replay buffer size (rows), one line per replay policy
    (``curves``: policy -> [(buffer rows, retained loss)]), and a dashed horizontal line per
    unbounded reference (``references``: label -> retained loss, e.g. uniform replay of
    every earlier row)."""
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    for i, (label, pts) in enumerate(sorted(curves.items())):
        pts = sorted(pts)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=f"C{i % 10}",
                label=label)
    for j, (label, y) in enumerate(sorted(references.items())):
        ax.axhline(y, color="k", ls="--", lw=1, alpha=0.6 - 0.2 * (j % 3), label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("replay buffer (rows)")
    ax.set_ylabel("retained loss: earlier domains (lower is better)")
    ax.set_title("retained loss vs replay buffer size")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _labelled_points(ax, points: Sequence[tuple[str, float, float]]) -> None:
    """One marker per ``(label, x, y)``, its label beside it, and a light grid."""
    for i, (label, x, y) in enumerate(points):
        ax.scatter([x], [y], color=f"C{i % 10}", zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.margins(0.15)  # room for the labels
    ax.grid(alpha=0.3)


def plot_scaling(cells: Sequence[dict], fits: Sequence[dict], path: str,
                 metric: str = "retained_loss") -> None:
    """A sweep's ``metric`` against training FLOPs (``cpt_jax.eval.scaling``): left, one
    curve per replay rate across model sizes; right, one curve per model size across
    replay rates. Markers are cell means with standard-error bars over seeds; dotted lines
    are the power-law fits L = a (C / C0)^-b + c of ``fits`` (``scaling.fit_curves``)."""
    fig = _figure((11, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    fit_of = {f["curve"]: f["fit"] for f in fits}
    for ax, along, title in ((axes[0], "size", "one curve per replay rate (across sizes)"),
                             (axes[1], "rate", "one curve per model size (across rates)")):
        for i, curve in enumerate(scaling.curves(cells, along)):
            cs = [c for c in curve["cells"] if c["flops"] and c[metric] is not None]
            xs, ys = [c["flops"] for c in cs], [c[metric] for c in cs]
            err = [c[f"{metric}_se"] or 0.0 for c in cs]
            color = f"C{i % 10}"
            ax.errorbar(xs, ys, yerr=err, marker="o", ms=5, capsize=3, color=color,
                        lw=1.2, label=curve["label"])
            for c in cs:
                tag = f"r={c['rate']:g}" if along == "rate" else str(c["size"])
                ax.annotate(tag, (c["flops"], c[metric]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=color)
            fit = fit_of.get(curve["label"])
            if fit is not None and xs:
                grid = np.geomspace(min(xs), max(xs), 100)
                ax.plot(grid, scaling.power_law(fit, grid), ls=":", color=color, lw=1.5)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel(f"{metric.replace('_', ' ')} (lower is better)")
    save_figure(fig, path)


def plot_pareto(cells: Sequence[dict], front: Sequence[int], path: str) -> None:
    """Retained against learned loss, one marker per sweep cell (mean over seeds, error
    bars: standard errors), the Pareto frontier (``scaling.pareto_front``) as a line."""
    fig = _figure((6.5, 4.5))
    ax = fig.add_subplot()
    sizes = list(dict.fromkeys(c["size"] for c in cells))
    marks = "os^Dvp*"
    rates = sorted({c["rate"] for c in cells})
    for c in cells:
        if c["learned_loss"] is None or c["retained_loss"] is None:
            continue
        ax.errorbar([c["learned_loss"]], [c["retained_loss"]],
                    xerr=[c["learned_loss_se"] or 0.0], yerr=[c["retained_loss_se"] or 0.0],
                    marker=marks[sizes.index(c["size"]) % len(marks)], ms=6, capsize=2,
                    color=f"C{rates.index(c['rate']) % 10}", ls="none")
    pts = [(cells[i]["learned_loss"], cells[i]["retained_loss"]) for i in front]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="k", lw=1, ls="--",
                label="Pareto frontier")
    for k, s in enumerate(sizes):
        ax.plot([], [], marker=marks[k % len(marks)], color="grey", ls="none", label=f"model {s}")
    for k, r in enumerate(rates):
        ax.plot([], [], marker="s", color=f"C{k % 10}", ls="none", label=f"replay {r:g}")
    _learned_retained_axes(ax, "sweep cells: retained vs learned (lower-left is better)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, path)

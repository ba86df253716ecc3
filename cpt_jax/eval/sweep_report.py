"""Read a sweep (``scripts/sweep.py``'s WORKDIR) and write its scaling analysis: the
tables, figures and answer of ``cpt_jax.eval.scaling``, as analysis.md, analysis.json,
scaling.png and pareto.png."""

from __future__ import annotations

import json
import os

from cpt_jax import atomic
from cpt_jax import sweep as sweep_lib
from cpt_jax.eval import plots, scaling
from cpt_jax.eval import report as report_lib


def load_sweep(sweep_dir: str) -> tuple[dict, dict, list[str]]:
    """(index, name -> results of the finished points, names of the unfinished ones)."""
    index = sweep_lib.read_index(sweep_dir)
    if index is None:
        raise FileNotFoundError(
            f"{sweep_dir} has no {sweep_lib.INDEX_FILE}: give the --workdir of a "
            "scripts/sweep.py sweep (it writes the index before the first run)")
    results, unfinished = {}, []
    for p in index["points"]:
        workdir = os.path.join(sweep_dir, p["workdir"])
        if sweep_lib.is_complete(workdir):
            results[p["name"]] = report_lib.load_results(workdir)
        else:
            unfinished.append(p["name"])
    return index, results, unfinished


def analyze(index: dict, results: dict, metric: str = "retained_loss") -> dict:
    """Rows, cells, Pareto frontier, power-law fits, comparisons and the answer."""
    rows = scaling.point_rows(index["points"], results)
    cells = scaling.aggregate(rows)
    comparisons = scaling.replay_vs_size(cells, metric)
    return {"metric": metric, "rows": rows, "cells": cells,
            "pareto": scaling.pareto_front(cells),
            "fits": scaling.fit_curves(rows, cells, metric),
            "comparisons": comparisons, "answer": scaling.answer(comparisons),
            "matched_flops": index.get("match") == "flops"}


def _pm(mean, se, digits=3) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se else "")


def _table(header, rows) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows])


def markdown(analysis: dict, unfinished=()) -> str:
    """analysis.md: the cells, the fits, the comparisons and the answer."""
    cells, metric = analysis["cells"], analysis["metric"]
    front = set(analysis["pareto"])
    out = ["Cells: mean ± standard error over seeds; losses in nats/token; FLOPs as the "
           "runs record them. Pareto: no other cell has both lower learned and lower "
           "retained loss."]
    others = sorted({k for c in cells for k in c["values"]
                     if k not in (scaling.SIZE_KEY, scaling.RATE_KEY)})
    out += [""] + _table(
        ["model", "non-emb. params", "replay rate", *others, "seeds", "training FLOPs",
         "learned", "retained", "forgetting", "Pareto"],
        [[c["size"], f"{c['params'] / 1e6:.2f}M" if c["params"] else "–", f"{c['rate']:g}",
          *[c["values"].get(k, "") for k in others], c["n"],
          f"{c['flops']:.3g}" if c["flops"] else "–",
          _pm(c["learned_loss"], c["learned_loss_se"]),
          _pm(c["retained_loss"], c["retained_loss_se"]),
          _pm(c["forgetting"], c["forgetting_se"]), "yes" if i in front else ""]
         for i, c in enumerate(cells)])
    fit_rows = []
    for f in analysis["fits"]:
        fit = f["fit"]
        if fit is None:
            fit_rows.append([f["curve"], f["points"], "–", "–", "–", "–",
                             "fewer than 3 FLOPs levels"])
            continue
        note = "exact fit (no residual dof)" if fit["n"] <= 3 else f"rss {fit['rss']:.2g}"
        if fit["at_bound"]:
            note += "; b at the search bound"
        fit_rows.append([f["curve"], f["points"], f"{fit['C0']:.0e}",
                         _pm(fit["a"], fit["a_se"]), _pm(fit["b"], fit["b_se"]),
                         _pm(fit["c"], fit["c_se"]), note])
    out += ["", f"Power-law fits of {metric.replace('_', ' ')} L(C) = a (C / C0)^-b + c "
            "(least squares over the seed-level points, ± standard errors):", ""]
    out += _table(["curve", "points", "C0", "a", "b", "c", "note"], fit_rows)
    if analysis["comparisons"]:
        out += ["", "Replay step vs the next model size at matched FLOPs "
                + ("(the sweep matched FLOPs: direct comparison)" if analysis["matched_flops"]
                   else "(the model-size path interpolated in log FLOPs at the replay "
                        "cell's FLOPs)") + ":", ""]
        out += _table(
            ["replay", "model", "FLOPs (replay cell)", f"{metric.replace('_', ' ')} with replay",
             "model-size path at those FLOPs", "margin (> 0: replay better)"],
            [[f"{c['rate_from']:g} -> {c['rate_to']:g}", f"{c['size_from']} -> {c['size_to']}",
              f"{c['flops_replay']:.3g}", f"{c['loss_replay']:.3f}",
              f"{c['loss_size_at_replay_flops']:.3f}", _pm(c["margin"], c["margin_se"])]
             for c in analysis["comparisons"]])
    out += ["", "**The question** (Abbes et al. 2025): at matched FLOPs, is a replay step a "
            "better use of compute than the next model size?", "", analysis["answer"]]
    if unfinished:
        out += ["", f"Not finished (left out): {', '.join(unfinished)}."]
    return "\n".join(out) + "\n"


def write_analysis(sweep_dir: str, out_dir: str | None = None,
                   metric: str = "retained_loss") -> dict:
    """Analyse the sweep in ``sweep_dir``; write analysis.md, analysis.json, scaling.png
    and pareto.png into ``out_dir`` (default SWEEP/analysis). Returns the analysis with
    ``markdown`` and ``files``."""
    index, results, unfinished = load_sweep(sweep_dir)
    if not results:
        raise ValueError(f"{sweep_dir}: no point has finished yet ({len(unfinished)} "
                         "unfinished); run or finish the sweep first")
    analysis = analyze(index, results, metric)
    out_dir = out_dir or os.path.join(sweep_dir, "analysis")
    md = markdown(analysis, unfinished)
    files = {"markdown": os.path.join(out_dir, "analysis.md"),
             "json": os.path.join(out_dir, "analysis.json"),
             "scaling": os.path.join(out_dir, "scaling.png"),
             "pareto": os.path.join(out_dir, "pareto.png")}
    plots.plot_scaling(analysis["cells"], analysis["fits"], files["scaling"], metric)
    plots.plot_pareto(analysis["cells"], analysis["pareto"], files["pareto"])
    atomic.write_text(files["markdown"], md)
    atomic.write_text(files["json"], json.dumps({**analysis, "unfinished": unfinished},
                                                indent=1))
    return {**analysis, "markdown": md, "files": files, "unfinished": unfinished}

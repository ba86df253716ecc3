"""Compare runs: one Markdown table and four figures from several ``results.json`` files.

Answers the question a CPT experiment asks, "how much did I forget, how much did I learn, at
what compute", for a set of runs (e.g. replay rates 0 / 0.25 / 0.5, or MER vs replay):

- a table with, per run: method, replay rate, model size, training FLOPs, learned loss,
  retained loss (earlier domains), final loss over all domains, forgetting (Chaudhry et al.
  2018), BWT (Lopez-Paz & Ranzato 2017), FWT and the mean loss over the whole run (area under
  the loss curves); the definitions are those of ``cpt_jax.eval.metrics``'s docstring, and
  ``DEFINITIONS`` (the text report.md carries) states them in the same terms;
- ``loss_curves.png``: every run's validation loss, one panel per domain;
- ``loss_matrices.png``: each run's loss matrix R[i][j] as a heatmap;
- ``retained_vs_flops.png``: retained loss against training FLOPs, one point per run;
- ``retained_vs_learned.png``: retained loss against learned loss, one point per run
  (lower-left is better: the stability-plasticity trade-off, e.g. of a MER meta-rate sweep);
- with runs of a bounded replay policy (``cpt_jax.replay.policies``): the table gains the
  replay policy and buffer size, and ``retained_vs_buffer.png`` plots retained loss against
  buffer size, one line per policy (runs that replay every earlier row: dashed lines).

report.md names runs by their labels (``run_labels``) only, never by local paths, so it can be
pasted into a README.

Metrics are recomputed from the loss matrix and curves (not read from ``results["metrics"]``)
so runs written by older versions compare on the same definitions. Training FLOPs come from
``results["compute"]["flops"]`` when the run recorded them, else from ``task_stats`` tokens
and the model config (``metrics.training_flops``).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from cpt_jax import atomic, results_file
from cpt_jax.eval import metrics as metrics_lib
from cpt_jax.eval import plots
from cpt_jax.eval.run_info import (  # also this module's public names, as before
    method_label, model_config, replay_rate_done, training_flops_of)

RESULTS_FILE = results_file.FILE
REQUIRED_KEYS = ("domains", "tasks", "loss_matrix", "eval_curve")  # what a report reads

COLUMNS = [  # (row key, table header)
    ("run", "run"), ("method", "method"), ("replay_rate", "replay rate"),
    ("params", "params"), ("flops", "training FLOPs"), ("learned_loss", "learned"),
    ("retained_loss", "retained"), ("final_loss_all", "final, all domains"),
    ("forgetting", "forgetting"), ("bwt", "BWT"), ("fwt", "FWT"),
    ("curve_area_mean", "mean loss over run"),
]
POLICY_COLUMNS = [("policy", "replay policy"), ("buffer_rows", "buffer rows")]
METRIC_KEYS = ("learned_loss", "retained_loss", "final_loss_all", "forgetting", "bwt",
               "fwt", "curve_area_mean")  # the columns taken from metrics_from_results

# What report.md says the columns mean: the definitions of cpt_jax.eval.metrics, same terms.
DEFINITIONS = (
    "Losses in nats/token (lower is better). R[i][j] is the loss on domain j after task i, "
    "tasks 0..T-1. learned: mean_j R[j][j]. retained: mean_{j < T-1} R[T-1][j], the final "
    "model on the earlier domains (a joint run: all but the last configured task's domain). "
    "final, all domains: mean_j R[T-1][j]. forgetting (Chaudhry et al. 2018): mean over "
    "j < T-1 of R[T-1][j] - min_{j <= l < T-1} R[l][j] (> 0 = forgotten). BWT (Lopez-Paz & "
    "Ranzato 2017): mean_{i < T-1} (R[i][i] - R[T-1][i]) (> 0 = later tasks helped). FWT: "
    "mean_{i >= 1} (b[i] - R[i-1][i]), b[i] the loss of a randomly initialised model, also "
    "for runs from a pre-trained checkpoint (> 0 = better than random before training on "
    "the domain). mean loss over run: area under each domain's loss curve / steps, averaged "
    "over domains. – = undefined (one task, a joint run, or b unknown). A mixture task's "
    "own loss is the weighted mean of its components, each an earlier domain afterwards; "
    "replay sources count as trained before task 0 (the start row is their own row and a "
    "best-so-far candidate); held-out domains enter no metric but the held-out change, "
    "final minus start.")


def load_results(run_dir: str) -> dict:
    """``RUN_DIR/results.json`` parsed (``cpt_jax.results_file.read``) with the keys the
    report needs; errors name the directory or file and what to do: ``FileNotFoundError``
    when there is none, ``ValueError`` when it cannot be used (both ``ResultsError``)."""
    return results_file.read(run_dir, require=REQUIRED_KEYS)


def run_row(results: dict, label: str) -> dict:
    """One table row (raw numbers, None where unknown) for a run's results."""
    config = results.get("config") or {}
    m = metrics_lib.metrics_from_results(results)
    cfg = model_config(results)
    replay = config.get("replay") or {}
    return {
        "run": label,
        "method": method_label(config, results.get("method")),
        "policy": replay.get("policy", "uniform"),
        "buffer_rows": replay.get("buffer_rows") or None,
        "replay_rate": replay_rate_done(results),
        "params": cfg.num_params() if cfg is not None else None,
        "flops": training_flops_of(results),
        **{k: m.get(k) for k in METRIC_KEYS},
    }


def _fmt(key: str, v) -> str:
    if v is None:
        return "–"
    if key == "params":
        for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if v >= div:
                return f"{v / div:.3g}{unit}"
        return str(v)
    if key == "flops":
        return f"{v:.3g}"
    if key == "replay_rate":
        return f"{v:g}"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v).replace("|", "\\|")


def _with_policies(rows: Sequence[dict]) -> bool:
    return any(r.get("policy", "uniform") != "uniform" for r in rows)


def markdown_table(rows: Sequence[dict]) -> str:
    """A GitHub-flavoured Markdown table of ``run_row`` rows (losses in nats/token); the
    replay policy columns only when a run has a policy other than uniform."""
    columns = COLUMNS[:3] + POLICY_COLUMNS + COLUMNS[3:] if _with_policies(rows) else COLUMNS
    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, r.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def loss_matrix_markdown(results: dict, label: str) -> str | None:
    """The run's loss matrix as a Markdown table when it has replay-source or held-out
    columns (marked in the header), with the start model's row first: the row before
    task 0 that those columns are measured from. None for a run with task columns only."""
    kinds = results.get("column_kinds") or {}
    if all(k == "task" for k in kinds.values()):
        return None
    cols, start = metrics_lib.loss_matrix_columns(results), results.get("init_losses") or {}
    lines = [f"Loss matrix of {label}:", "",
             "| after | " + " | ".join(metrics_lib.column_labels(results)) + " |",
             "| --- |" + " --- |" * len(cols),
             "| start | " + " | ".join(_fmt("loss", start.get(c)) for c in cols) + " |"]
    for task, row in zip(results["tasks"], results["loss_matrix"]):
        lines.append(f"| {task} | " + " | ".join(_fmt("loss", float(x)) for x in row) + " |")
    change = metrics_lib.metrics_from_results(results).get("heldout_change")
    if change:
        lines += ["", "held-out change (final minus start): " + ", ".join(
            f"{d} {v:+.3f}" for d, v in change["per_domain"].items())]
    return "\n".join(lines)


def run_labels(run_dirs: Sequence[str]) -> list[str]:
    """Short unique labels: each directory's name, with a #k suffix on repeats."""
    labels, seen = [], {}
    for d in run_dirs:
        base = os.path.basename(os.path.normpath(os.path.abspath(d))) or d
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return labels


def _points(rows: Sequence[dict], x_key: str) -> list[tuple[str, float, float]]:
    """``(run, x, retained_loss)`` of the rows where both values are known."""
    return [(r["run"], r[x_key], r["retained_loss"]) for r in rows
            if r[x_key] is not None and r["retained_loss"] is not None]


def write_report(run_dirs: Sequence[str], out_dir: str) -> dict:
    """Read every run, then write the table and figures into ``out_dir``.

    Every run is read (and validated) before anything is written. Returns
    ``{"rows": [...], "markdown": str, "files": {name: path}}``; files are ``report.md``,
    ``report.json`` (the rows as numbers), ``loss_curves.png``, ``loss_matrices.png``,
    ``retained_vs_flops.png`` and ``retained_vs_learned.png``. A run lacking a plotted
    value (no FLOPs, or a joint run's learned loss) has no point in that figure.
    """
    if not run_dirs:
        raise ValueError("no run directories given")
    results = [load_results(d) for d in run_dirs]
    labels = run_labels(run_dirs)
    runs = dict(zip(labels, results))
    rows = [run_row(r, label) for label, r in runs.items()]
    table = markdown_table(rows)

    os.makedirs(out_dir, exist_ok=True)
    files = {name: os.path.join(out_dir, name) for name in (
        "report.md", "report.json", "loss_curves.png", "loss_matrices.png",
        "retained_vs_flops.png", "retained_vs_learned.png")}
    plots.plot_runs_loss_curves(runs, files["loss_curves.png"])
    plots.plot_loss_matrices(runs, files["loss_matrices.png"])
    plots.plot_retained_vs_flops(_points(rows, "flops"), files["retained_vs_flops.png"])
    plots.plot_retained_vs_learned(_points(rows, "learned_loss"),
                                   files["retained_vs_learned.png"])

    md = ["# Continual pre-training runs", "", DEFINITIONS, "", table, "",
          "![loss curves](loss_curves.png)", "",
          "![loss matrices](loss_matrices.png)", ""]
    for label, res in runs.items():
        section = loss_matrix_markdown(res, label)
        if section:
            md += [section, ""]
    md += ["![retained loss vs training FLOPs](retained_vs_flops.png)", "",
          "![retained loss vs learned loss](retained_vs_learned.png)"]
    if _with_policies(rows):
        files["retained_vs_buffer.png"] = os.path.join(out_dir, "retained_vs_buffer.png")
        curves, refs = {}, {}
        for r, res in zip(rows, results):
            if r["retained_loss"] is None:
                continue
            name = (res.get("config") or {}).get("name") or r["policy"]
            if r["buffer_rows"]:
                curves.setdefault(name, []).append((r["buffer_rows"], r["retained_loss"]))
            else:
                refs[f"{name} (every earlier row)"] = r["retained_loss"]
        plots.plot_retained_vs_buffer(curves, refs, files["retained_vs_buffer.png"])
        md += ["", "![retained loss vs replay buffer size](retained_vs_buffer.png)"]
    atomic.write_text(files["report.md"], "\n".join(md) + "\n")
    atomic.write_text(files["report.json"], json.dumps({"rows": rows}, indent=1) + "\n")
    return {"rows": rows, "markdown": table, "files": files}

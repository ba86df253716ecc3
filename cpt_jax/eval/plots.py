"""Figures of a run, written from results.json content (matplotlib, no display needed)."""

from __future__ import annotations

import os


def plot_loss_curves(results: dict, path: str) -> None:
    """Every domain's validation loss over training steps, task boundaries marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = results["eval_curve"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for domain in results["domains"]:
        pts = [(e["step"], e["losses"][domain]) for e in curve if domain in e["losses"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=domain)
    for b in results.get("task_boundaries", []):
        ax.axvline(b["end_step"], color="grey", linestyle="--", linewidth=0.8)
        ax.text(b["end_step"], ax.get_ylim()[1], f" end of {b['task']}", rotation=90,
                va="top", ha="right", fontsize=7, color="grey")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/token)")
    title = results.get("config", {}).get("name") or "continual pre-training"
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)

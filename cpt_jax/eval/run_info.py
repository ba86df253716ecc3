"""What one run's results dict says about the run besides its metrics: its model config,
its training FLOPs, the replay rate it ran and a method label. Shared by the run report
(``report.py``) and the scaling analysis (``scaling.py``); pure functions of the dict
(fields in docs/results.md), so runs written by older versions read the same way."""

from __future__ import annotations

import dataclasses

from cpt_jax.eval import metrics as metrics_lib
from cpt_jax.model import LlamaConfig


def model_config(results: dict):
    """The run's ``LlamaConfig`` from ``results["config"]["model"]``, or None if absent."""
    model = (results.get("config") or {}).get("model")
    if not model:
        return None
    names = {f.name for f in dataclasses.fields(LlamaConfig)}
    return LlamaConfig.from_dict({k: v for k, v in model.items() if k in names})


def method_label(config: dict, method=None) -> str:
    """A method name for the table: "joint" for a joint run; else the methods the run
    selected (results' top-level ``method``, or ``config.method``: a string or a dict's
    ``name``, e.g. "replay+reptile") unless that is plain "replay"; else ``config.name``;
    else "replay" / "sequential" from the replay rate."""
    if config.get("joint"):
        return "joint"
    method = method or config.get("method")
    if isinstance(method, dict):
        method = method.get("name")
    if method and method != "replay":
        return str(method)
    if config.get("name"):
        return str(config["name"])
    rate = (config.get("replay") or {}).get("rate")
    return "replay" if rate else "sequential"


def training_flops_of(results: dict) -> float | None:
    """Training FLOPs of a run: recorded by the run, or recomputed from its token counts."""
    compute = results.get("compute") or {}
    if compute.get("flops") is not None:
        return float(compute["flops"])
    stats = results.get("task_stats") or []
    if stats and all("flops" in t for t in stats):
        return float(sum(t["flops"] for t in stats))
    cfg, seq_len = model_config(results), (results.get("config") or {}).get("seq_len")
    if not stats or cfg is None or seq_len is None:
        return None
    return metrics_lib.with_flops(stats, cfg, int(seq_len))[1]["flops"]


def replay_rate_done(results: dict) -> float | None:
    """The configured replay rate, or 0 when the run replayed no token (a one-task run has
    no earlier task to replay, whatever the config says)."""
    rate = ((results.get("config") or {}).get("replay") or {}).get("rate")
    if rate and (results.get("compute") or {}).get("replay_tokens") == 0:
        return 0.0
    return rate

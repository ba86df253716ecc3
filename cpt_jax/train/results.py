"""What a run has measured (``Progress``, saved with every checkpoint) and the
``results.json`` made from it (``make_results``; every field in docs/results.md)."""

from __future__ import annotations

import dataclasses

import numpy as np

from cpt_jax.eval import metrics as metrics_lib
from cpt_jax.replay.permutation import stream_items
from cpt_jax.results_file import SCHEMA_VERSION


@dataclasses.dataclass
class Progress:
    """Where the run stands and what it has measured: saved (as JSON) with every checkpoint.

    ``task``/``step``: the next step to run is step ``step`` of task ``task`` (``task`` ==
    number of tasks once the run is done); ``step`` == 0 means the task's boundary update
    (teacher snapshot, anchors, Fisher) has not been applied yet.
    """

    task: int = 0
    step: int = 0
    global_step: int = 0
    data_fingerprints: dict | None = None  # resume.data_fingerprints of the run's data
    init_losses: dict = dataclasses.field(default_factory=dict)  # the starting model
    init_losses_random: dict = dataclasses.field(default_factory=dict)  # FWT's baseline
    eval_curve: list = dataclasses.field(default_factory=list)
    loss_matrix: list = dataclasses.field(default_factory=list)
    task_boundaries: list = dataclasses.field(default_factory=list)
    task_stats: list = dataclasses.field(default_factory=list)


def tokens_by_domain(sampler, task: int, steps: int, slot_names, seq_len: int,
                     joint=None) -> dict:
    """{"new_tokens_by_domain", "replay_tokens_by_domain"} of a task's ``steps`` steps:
    the new tokens each of its components gave, and the replayed tokens each earlier
    domain gave (counted from the sampler's batches, replay pools included).

    ``joint``: (ConcatRows of the joint task, its domains' names): the joint task's new
    rows are split by the domain each comes from (full epochs give every row once, the
    last partial epoch is read off the permutation)."""
    slots, _ = sampler.task_slots[task]
    new = sampler.new_rows_before_by_slot(task, steps)
    if joint is not None:
        rows, names = joint
        total, n = int(new[0]), sampler.train_rows[0]
        epochs = total // n
        ids = stream_items(sampler.seed, "new", 0, np.arange(epochs * n, total), n)
        owner = np.searchsorted(rows.starts, ids, side="right") - 1
        counts = epochs * np.diff(rows.starts) + np.bincount(owner, minlength=len(names))
        return {"new_tokens_by_domain": {d: int(c) * seq_len for d, c in zip(names, counts)},
                "replay_tokens_by_domain": {}}
    replayed = np.zeros(len(sampler.train_rows), np.int64)
    if sampler.first_slot[task] and sampler.replay_rows_before(task, steps):
        for t in range(steps):
            ids, _ = sampler.replay_rows_of(task, t)
            owner = np.searchsorted(sampler.starts, ids, side="right") - 1
            replayed += np.bincount(owner, minlength=len(replayed))
    return {"new_tokens_by_domain": {slot_names[s]: int(r) * seq_len
                                     for s, r in zip(slots, new)},
            "replay_tokens_by_domain": {slot_names[s]: int(r) * seq_len
                                        for s, r in enumerate(replayed) if r}}


def _sum_by_domain(task_stats, key: str) -> dict:
    out: dict = {}
    for t in task_stats:
        for d, v in t.get(key, {}).items():
            out[d] = out.get(d, 0) + int(v)
    return out


def make_results(config, parts, progress: Progress, config_json: dict) -> dict:
    """results.json (every field in docs/results.md): a pure function of the config, no
    wall times. ``schema_version`` comes first (``cpt_jax.results_file``)."""
    task_stats, compute = metrics_lib.with_flops(progress.task_stats, parts.mcfg,
                                                 config.seq_len)
    compute["new_tokens_by_domain"] = _sum_by_domain(task_stats, "new_tokens_by_domain")
    compute["replay_tokens_by_domain"] = _sum_by_domain(task_stats, "replay_tokens_by_domain")
    results = {
        "schema_version": SCHEMA_VERSION,
        "domains": parts.names,
        "columns": parts.eval_order,
        "column_kinds": parts.recipe.kinds if parts.recipe else {},
        "tasks": parts.task_names,
        "method": config.method.name,
        "loss_matrix": progress.loss_matrix,
        "init_losses": progress.init_losses,
        "init_losses_random": progress.init_losses_random,
        "eval_curve": progress.eval_curve,
        "task_boundaries": progress.task_boundaries,
        "task_stats": task_stats,
        "compute": compute,
        "config": config_json,
    }
    results["metrics"] = metrics_lib.metrics_from_results(results)
    return results

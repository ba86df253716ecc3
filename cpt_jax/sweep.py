"""A sweep: a grid of run configs, each point one ``scripts/train.py`` run in its own workdir.

``expand_grid`` turns ``--grid KEY=V1,V2`` axes into points (their product, in the order
given); ``model=NAME`` is a preset of ``cpt_jax.presets`` and any other key a config key.
Every point is a list of ``--config.KEY=VALUE`` overrides on top of the sweep's config
file and shared overrides, so its command can run anywhere (``point_command``).

``match_flops`` gives every point the same training FLOPs: each point's task budgets are
scaled by budget / (its FLOPs at the configured budgets), FLOPs counted as the run records
them and the benchmark counts them (``LlamaConfig.flops_per_token`` x trained tokens, steps
from ``rates.task_steps`` under the run's replay accounting).

The sweep's state is ``WORKDIR/index.json`` (``write_index``, atomic): per point its workdir
(relative to the sweep), grid values, overrides, status (pending, running, done, failed,
interrupted), the error of a failed run and its wall seconds. A point is done when its
``results.json`` holds a loss row for every task (``is_complete``), whatever the index says.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shlex
import statistics
import sys
from typing import Sequence

from cpt_jax import atomic, cli, pretrained, results_file
from cpt_jax.eval.metrics import training_flops
from cpt_jax.presets import model_preset
from cpt_jax.replay.rates import task_steps

INDEX_FILE = "index.json"
RESULTS_FILE = results_file.FILE


@dataclasses.dataclass
class Point:
    """One run of the sweep: its grid values and the config overrides they mean."""

    name: str  # also its workdir under the sweep directory
    values: dict  # grid key -> value text, e.g. {"model": "tiny", "replay.rate": "0.25"}
    overrides: list  # [(config key, value text)] after the sweep's shared overrides
    flops: float | None = None  # training FLOPs at its (possibly matched) task budgets

    def to_json(self) -> dict:
        return {"name": self.name, "workdir": self.name, "values": self.values,
                "overrides": {k: v for k, v in self.overrides}, "flops": self.flops}


def parse_axis(text: str) -> tuple[str, list[str]]:
    """``"KEY=V1,V2"`` -> (KEY, [V1, V2]). Values are split at commas, so a value cannot
    hold one: vary a list-valued key (e.g. ``tasks``) through separate sweeps."""
    key, eq, values = text.partition("=")
    key = key.strip().removeprefix("config.")
    items = [v.strip() for v in values.split(",")]
    if not eq or not key or not all(items):
        raise cli.UserError(f"--grid {text!r}: write KEY=V1,V2,... e.g. --grid "
                            "replay.rate=0,0.25,0.5 or --grid model=tiny,small,base")
    if len(set(items)) != len(items):
        raise cli.UserError(f"--grid {text!r} repeats a value")
    return key, items


def point_name(values: dict) -> str:
    """A directory name from the grid values: ``model-tiny_replay.rate-0.25_seed-0``."""
    parts = [f"{k}-{v}" for k, v in values.items()]
    return re.sub(r"[^A-Za-z0-9._=-]+", "~", "_".join(parts)) or "point"


def expand_grid(axes: Sequence[tuple[str, list[str]]]) -> list[Point]:
    """The product of the axes, first axis slowest, as points with their overrides."""
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise cli.UserError(f"--grid names a key twice: {keys}")
    points = []
    for combo in itertools.product(*[vals for _, vals in axes]):
        values = dict(zip(keys, combo))
        overrides = []
        for key, value in values.items():
            if key == "model":
                try:
                    preset = model_preset(value)
                except ValueError as e:
                    raise cli.UserError(f"--grid model={value}: {e}") from None
                overrides += [(k, "none" if v is None else str(v)) for k, v in preset.items()]
            else:
                overrides.append((key, value))
        points.append(Point(point_name(values), values, overrides))
    return points


def point_config(spec: str, shared: Sequence[tuple[str, str]], point: Point):
    """The point's run config (the file, the shared overrides, then the point's)."""
    return cli.load_config(spec, list(shared) + list(point.overrides))


def config_flops(config) -> float:
    """Training FLOPs of a run of ``config``: trained tokens x FLOPs per token, as the run
    records them (``results["compute"]["flops"]``)."""
    steps = sum(task_steps(config, [dict(t) for t in config.tasks]))
    return training_flops(pretrained.model_config(config),
                          steps * config.global_batch * config.seq_len, config.seq_len)


def _scaled_tasks(tasks: list[dict], factor: float) -> list[dict]:
    out = []
    for t in tasks:
        key = "steps" if t.get("steps") is not None else "tokens"
        out.append({**t, key: max(1, round(t[key] * factor))})
    return out


def match_flops(spec: str, shared, points: list[Point], budget: str) -> float:
    """Rescale every point's task budgets (all tasks by one factor) so that its training
    FLOPs equal the budget: ``min``, ``max`` or ``median`` of the points' FLOPs at the
    configured budgets, or a number. Returns the budget; each point gets a ``tasks``
    override and its matched ``flops``."""
    configs = [point_config(spec, shared, p) for p in points]
    natural = [config_flops(c) for c in configs]
    named = {"min": min, "max": max, "median": statistics.median}
    try:
        target = named[budget](natural) if budget in named else float(budget)
    except ValueError:
        raise cli.UserError(f"--budget {budget!r}: give min, max, median or a number of "
                            "FLOPs such as 3e15") from None
    if target <= 0:
        raise cli.UserError(f"--budget {budget}: must be > 0")
    for point, config, flops in zip(points, configs, natural):
        tasks = [dict(t) for t in config.tasks]
        config.unlock()
        factor = target / flops
        for _ in range(2):  # scale, then correct once for the rounding of steps per task
            config.tasks = scaled = _scaled_tasks(tasks, factor)
            got = config_flops(config)
            factor *= target / got
        point.overrides = [o for o in point.overrides if o[0] != "tasks"]
        point.overrides.append(("tasks", json.dumps(scaled)))
        point.flops = got
    return target


def is_complete(workdir: str) -> bool:
    """True when ``workdir/results.json`` is readable (``results_file.read``: it exists,
    parses and is of a schema version this code reads) and has a loss row per task."""
    try:
        results = results_file.read(workdir, require=("loss_matrix", "tasks"))
        return len(results["loss_matrix"]) == len(results["tasks"]) > 0
    except (OSError, ValueError, TypeError):  # ResultsError is a ValueError
        return False


def point_command(spec: str, shared, point: Point, sweep_dir: str,
                  python: str = sys.executable) -> list[str]:
    """argv of the point's ``scripts/train.py`` run (resumes its workdir if it exists)."""
    train = os.path.relpath(os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "train.py"))
    argv = [python, train, "--config", spec, "--workdir", os.path.join(sweep_dir, point.name)]
    return argv + [f"--config.{k}={v}" for k, v in list(shared) + list(point.overrides)]


def shell_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def read_index(sweep_dir: str) -> dict | None:
    path = os.path.join(sweep_dir, INDEX_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise cli.UserError(f"{path} is not valid JSON ({e}); delete it and run the sweep "
                            "again (finished points are found from their results.json)")


def write_index(sweep_dir: str, index: dict) -> None:
    atomic.write_json(os.path.join(sweep_dir, INDEX_FILE), index)

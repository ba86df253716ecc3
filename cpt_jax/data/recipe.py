"""The data recipe of a run: what each domain of ``data.domains`` is for.

A domain is one of three kinds of column of the loss matrix:

- a **task** domain: trained by a task, alone (``{"domain": "de", "steps": N}``) or as a
  component of a weighted mixture (``{"domains": {"de_web": 0.8, "de_wiki": 0.2},
  "steps": N}``, weights normalised);
- a **replay source** (``replay.sources``): never trained, replayable from task 0 on, as
  if it had been trained before it (the original-data proxy of a pre-trained model);
- **held-out**: never trained nor replayed, only evaluated.

The replay sampler sees *slots*: the training-row sets it reads, in the order the run
meets them, replay sources first, then each task's components in task order. Row ids are
global over the slots, so "every row of an earlier slot" is a prefix ``[0,
starts[first_slot[k]])``: task k's replay pool holds the sources and every earlier task's
components. Without sources and mixtures slot k is task k, as before this module existed.

``Recipe`` is a pure function of (tasks, domain names, replay sources), so the results and
the report rebuild it from a results.json's config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

KIND_TASK, KIND_SOURCE, KIND_HELDOUT = "task", "replay_source", "heldout"


def task_components(task: Mapping) -> dict[str, float]:
    """{domain: weight} of one task, weights summing to 1 (a plain task: weight 1)."""
    if "domains" in task:
        weights = {str(k): float(v) for k, v in dict(task["domains"]).items()}
        total = sum(weights.values())
        return {k: v / total for k, v in weights.items()}
    return {str(task["domain"]): 1.0}


def task_name(task: Mapping) -> str:
    """A task's label: its "name", its domain, or its components joined by "+"."""
    if task.get("name"):
        return str(task["name"])
    return "+".join(task_components(task))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Columns, their kinds, and the sampler's slots (see the module docstring)."""

    columns: tuple[str, ...]  # data.domains order
    tasks: tuple[dict, ...]  # per task {domain: weight}
    task_names: tuple[str, ...]
    sources: tuple[str, ...]

    @classmethod
    def build(cls, tasks: Sequence[Mapping], domains: Sequence[str],
              sources: Sequence[str] = ()) -> "Recipe":
        tasks = [dict(t) for t in tasks]
        return cls(tuple(domains), tuple(task_components(t) for t in tasks),
                   tuple(task_name(t) for t in tasks), tuple(sources))

    @classmethod
    def of_config(cls, config) -> "Recipe":
        """The recipe of a run config (ConfigDict or its JSON dict)."""
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(
            config, k, d))
        domains = [d["name"] for d in get("data")["domains"]]
        replay = get("replay") or {}
        sources = list(replay.get("sources", []) or [])
        return cls.build(list(get("tasks")), domains, sources)

    @property
    def trained(self) -> tuple[str, ...]:
        """Task domains in the order they are trained."""
        return tuple(d for t in self.tasks for d in t)

    def kind(self, domain: str) -> str:
        if domain in self.sources:
            return KIND_SOURCE
        return KIND_TASK if domain in self.trained else KIND_HELDOUT

    @property
    def kinds(self) -> dict[str, str]:
        return {d: self.kind(d) for d in self.columns}

    @property
    def heldout(self) -> tuple[str, ...]:
        return tuple(d for d in self.columns if self.kind(d) == KIND_HELDOUT)

    # The sampler's view -----------------------------------------------------------------

    @property
    def slots(self) -> tuple[str, ...]:
        """Domains with training rows, in sampler order: sources, then task components."""
        return self.sources + self.trained

    @property
    def task_slots(self) -> list[dict[int, float]]:
        """Per task {slot: weight}."""
        out, slot = [], len(self.sources)
        for t in self.tasks:
            out.append({slot + i: w for i, w in enumerate(t.values())})
            slot += len(t)
        return out

    @property
    def first_slot(self) -> list[int]:
        """Per task, its first slot: the replay pool is every slot before it."""
        return [min(s) for s in self.task_slots]

    @property
    def plain(self) -> bool:
        """No sources and no mixtures: slot k is task k."""
        return not self.sources and all(len(t) == 1 for t in self.tasks)

"""A toy continual-learning method with memory, written as a new method would be: this one
file plus one registry line (``methods.REGISTRY["tally"] = METHOD``), nothing in the loop
or the checkpointer.

At every task boundary it records the mean of the final norm's scale, and its loss term
pulls each replayed token's mean logit toward the mean of everything recorded so far: the
term depends on all earlier boundaries, so a resumed run that lost the memory would
compute something else.

Keys: ``method.tally.weight`` (> 0).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cpt_jax.methods.base import Method, MethodMemory

MAX_TASKS = 8


class TallyMemory(MethodMemory):
    def __init__(self, config, placement, train_sources):
        del config, placement, train_sources
        self.values = np.zeros(MAX_TASKS, np.float64)  # one entry per boundary
        self.count = 0

    def task_start(self, params, task, pool, starts):
        if task:  # a boundary: the weights that finished task - 1
            self.values[self.count] = float(np.mean(np.asarray(params["final_norm"]["scale"])))
            self.count += 1

    def anchor(self) -> float:
        return float(self.values[:self.count].mean()) if self.count else 0.0

    def extras(self, task, step, idx):
        return {"tally_anchor": np.full(len(idx.row), self.anchor(), np.float32)}

    def to_arrays(self):
        return {"values": self.values.copy(), "count": np.asarray(self.count, np.int64)}

    def load_arrays(self, arrays):
        self.values = np.asarray(arrays["values"], np.float64).copy()
        self.count = int(arrays["count"])


def _replay_loss(config):
    weight = config.method.tally.weight

    def term(logits, batch, mask, teacher_logits):
        del teacher_logits
        gap = logits.mean(axis=-1) - batch["tally_anchor"][:, None]  # [B, L]
        se = jnp.sum(jnp.square(gap) * mask)
        return weight * se, "tally", se

    return term


METHOD = Method(name="tally", defaults={"weight": 0.0}, replay_loss=_replay_loss,
                memory=TallyMemory, active=lambda c: c.method.tally.weight > 0)

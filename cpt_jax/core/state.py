"""Train state and its placement on the mesh.

The state is an explicit pytree (step, params, opt_state). A ``Placement`` says where a
run's arrays live (model config, mesh, sharding rules, the state's shardings): every
jitted builder of a run (train, eval, row-loss and feature steps, the task boundary, a
method's memory) takes it. Parameter shardings come from the
model's logical axis names through the config's rules; every parameter-shaped subtree of the
optimizer state (Adam moments, Reptile slow weights, EWC anchors, ...) is sharded exactly
like the parameters, and the remaining scalars are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from cpt_jax import model as model_lib
from cpt_jax import sharding as sharding_lib


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken over the whole task sequence
    params: dict
    opt_state: optax.OptState
    # Frozen teacher for logit distillation on replayed rows (snapshot at each task
    # boundary), sharded like params; None when no distillation is configured.
    teacher: Any = None


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run's arrays live: built once at setup, handed to every jitted builder."""

    mcfg: model_lib.LlamaConfig
    mesh: jax.sharding.Mesh
    rules: Any  # logical-axis rules (cpt_jax.sharding)
    shardings: TrainState  # NamedSharding of every leaf of the train state

    def activate(self):
        """The mesh and rules as the ambient context of a traced function."""
        return sharding_lib.activate(self.mesh, self.rules)


def param_shardings(config: model_lib.LlamaConfig, mesh, rules):
    return sharding_lib.logical_to_sharding(model_lib.param_logical_axes(config), mesh, rules)


def state_shardings(config: model_lib.LlamaConfig, tx, mesh, rules, teacher: bool = False):
    """NamedShardings for every leaf of the TrainState (computed abstractly, no allocation)."""
    p_shard = param_shardings(config, mesh, rules)
    abstract = jax.eval_shape(functools.partial(_init_state, config, tx), jax.random.key(0))
    rep = sharding_lib.replicated(mesh)
    opt_shard = optax.tree_map_params(
        tx, lambda _, s: s, abstract.opt_state, p_shard,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return TrainState(step=rep, params=p_shard, opt_state=opt_shard,
                      teacher=p_shard if teacher else None)


def abstract_train_state(config: model_lib.LlamaConfig, tx, shardings: TrainState):
    """The TrainState as jax.ShapeDtypeStructs carrying `shardings` (no allocation): the
    target a checkpoint is restored into, each array straight onto its devices."""
    abstract = jax.eval_shape(
        functools.partial(_init_state, config, tx, teacher=shardings.teacher is not None),
        jax.random.key(0))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def _init_state(config, tx, key, params=None, teacher=False):
    if params is None:
        params = model_lib.init_params(config, key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      teacher=jax.tree.map(jnp.copy, params) if teacher else None)


def create_train_state(config: model_lib.LlamaConfig, tx, mesh, rules, key, params=None,
                       teacher: bool = False):
    """Initialise (or adopt `params` into) a sharded TrainState; returns (state, shardings).

    Initialisation runs under jit with the target out_shardings, so every array is created
    directly on its devices and never materialised whole on one host. (No ambient mesh here:
    Flax's DenseGeneral initialises kernels flat, so logical constraints at init would misfire.)
    """
    shardings = state_shardings(config, tx, mesh, rules, teacher)
    if params is None:
        init = jax.jit(functools.partial(_init_state, config, tx, teacher=teacher),
                       out_shardings=shardings)
        state = init(key)
    else:
        params = jax.device_put(params, shardings.params)
        init = jax.jit(lambda p: _init_state(config, tx, None, p, teacher),
                       in_shardings=(shardings.params,), out_shardings=shardings)
        state = init(params)
    return state, shardings

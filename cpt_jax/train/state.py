"""The train state, importable from here as before; it lives in ``cpt_jax.core.state``,
below the methods and the trainer that both use it."""

from cpt_jax.core.state import (Placement, TrainState, abstract_train_state,
                                create_train_state, param_shardings, state_shardings)

__all__ = ["Placement", "TrainState", "abstract_train_state", "create_train_state",
           "param_shardings", "state_shardings"]

"""The method registry: selection by name, composition into one optax chain, and adding a
method as one object plus one registry entry."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpt_jax import methods
from cpt_jax.methods.base import Method
from cpt_jax.methods import make_optimizer
from cpt_jax.optim.schedules import make_schedule
from cpt_jax.optim.transforms import PerSourceGrads
from cpt_jax.run_config import default_config


def _names(config):
    return [m.name for m in methods.selected(config)]


def test_selection_puts_the_combiner_first_and_implies_replay():
    c = default_config()
    assert _names(c) == ["replay"]
    c.method.name = "ewc"
    assert _names(c) == ["replay", "ewc"]
    c.method.name = "reptile+replay"
    assert _names(c) == ["replay", "reptile"]
    c.method.name = "ewc+agem"  # agem combines instead of replay
    assert _names(c) == ["agem", "ewc"]
    c.method.name = "replay+nope"
    with pytest.raises(ValueError, match="'nope'"):
        methods.selected(c)


def test_default_config_holds_every_registered_methods_keys():
    c = default_config().method
    for name, m in methods.REGISTRY.items():
        assert (name in c) == bool(m.defaults)
        for key, value in m.defaults.items():
            assert c[name][key] == value


def _first_update(config, grads, params):
    tx = make_optimizer(config, make_schedule(config.optim, 10))
    upd, _ = tx.update(grads, tx.init(params), params)
    return np.asarray(upd["w"])


def test_a_new_method_is_one_object_and_one_registry_line(monkeypatch):
    """A toy method, "a constant pull" added to the gradient before clipping, registered
    and composed with replay by name. AdamW's first step is -lr * m_hat / (sqrt(v_hat) +
    eps) with m_hat = g, v_hat = g^2 (bias-corrected), i.e. -lr * sign(g) per element
    (weight decay 0): so the toy term must flip the sign of the elements where it
    outweighs the gradient, and only when selected."""
    pull = jnp.array([3.0, -3.0, 0.5])

    def constant_pull(config):
        del config
        return optax.GradientTransformation(
            lambda params: optax.EmptyState(),
            lambda u, s, params=None: (jax.tree.map(lambda x: x + pull, u), s))

    toy = Method(name="pull", regularize=constant_pull)  # the new method
    monkeypatch.setitem(methods.REGISTRY, "pull", toy)  # its registry line

    c = default_config()
    c.optim.update(dict(lr=0.1, weight_decay=0.0, warmup_steps=0, clip_norm=1e9))
    params = {"w": jnp.ones(3)}  # (all-zero weights would trip the update-norm guard)
    g = {"w": jnp.array([-1.0, 1.0, 1.0])}
    grads = PerSourceGrads(g, None, jnp.float32(4), jnp.float32(0))
    lr = float(make_schedule(c.optim, 10)(0))
    np.testing.assert_allclose(_first_update(c, grads, params), -lr * np.sign([-1, 1, 1]),
                               rtol=1e-5)
    c.method.name = "replay+pull"
    np.testing.assert_allclose(_first_update(c, grads, params), -lr * np.sign([2, -2, 1.5]),
                               rtol=1e-5)


def test_boundary_actions_of_the_selected_methods_only():
    """TaskBoundary runs the selected methods' actions: with l2 (task_start) and distill,
    the anchor and the teacher move to the current weights; EWC unselected leaves no
    Fisher rows to draw."""
    c = default_config()
    c.method.name = "replay+l2+distill"
    c.method.l2.update(dict(weight=1.0, anchor="task_start"))
    c.method.distill.weight = 1.0
    assert methods.compose(c, None, lambda step: 1e-3).teacher
    chosen = methods.selected(c)
    actions = [m.boundary(c, None) for m in chosen if m.boundary]
    assert len([a for a in actions if a is not None]) == 2
    assert max(m.boundary_rows(c) for m in chosen) == 0
    c.method.l2.anchor = "init"  # the anchor stays at the start: no action
    actions = [m.boundary(c, None) for m in methods.selected(c) if m.boundary]
    assert len([a for a in actions if a is not None]) == 1

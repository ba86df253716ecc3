"""The methods a run can select (``REGISTRY``: one line per method), their config keys,
and which of them ``method.name`` selects (``selected``) and whether their keys are valid
(``check``)."""

from __future__ import annotations

import ml_collections

from cpt_jax.methods import agem, der, distill, ewc, l2, replay, reptile
from cpt_jax.methods.base import Method

REGISTRY: dict[str, Method] = {m.name: m for m in (
    replay.METHOD, agem.METHOD, reptile.METHOD, l2.METHOD, ewc.METHOD, distill.METHOD,
    der.METHOD)}


def default_config() -> ml_collections.ConfigDict:
    """``config.method``: the selection, replay's source weights and every method's keys."""
    c = ml_collections.ConfigDict()
    c.name = "replay"
    # Per-source gradient weights (current, replay); None = token-proportional, i.e. the
    # gradient of the mixed batch's mean loss.
    c.mix_weights = ml_collections.FieldReference(None, field_type=list)
    for m in REGISTRY.values():
        if m.defaults:
            c[m.name] = ml_collections.ConfigDict(m.defaults)
    return c


def selected(config) -> list[Method]:
    """The methods ``config.method.name`` selects, with the combiner first."""
    names = [n.strip() for n in str(config.method.name).split("+") if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        raise ValueError(f"method.name={config.method.name!r}: {unknown or 'empty'} not a "
                         f"method; join any of {sorted(REGISTRY)} with '+'")
    methods = [REGISTRY[n] for n in dict.fromkeys(names)]
    combiners = [m for m in methods if m.combine and m.name != "replay"]
    if len(combiners) > 1:
        raise ValueError(f"method.name={config.method.name!r}: {[m.name for m in combiners]} "
                         "each combine the replay and current gradients; select one")
    if not combiners and replay.METHOD not in methods:
        methods.insert(0, replay.METHOD)
    if combiners:
        methods = [m for m in methods if m is not replay.METHOD]
    return sorted(methods, key=lambda m: m.combine is None)


def check(config) -> None:
    """Every selected method's keys are valid, and no method is configured unselected."""
    chosen = selected(config)
    for m in REGISTRY.values():
        if m.active(config) and m not in chosen:
            raise ValueError(f"method.{m.name} is configured but method.name="
                             f"{config.method.name!r} does not select it; add '+{m.name}' "
                             f"or clear method.{m.name}")
        if m in chosen and m.defaults and not m.active(config) and m.combine is None:
            raise ValueError(f"method.name selects {m.name} but method.{m.name} leaves it "
                             f"without effect ({dict(config.method[m.name])}); set its "
                             "strength")
        if m in chosen:
            m.check(config)

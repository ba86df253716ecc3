"""Named Llama shapes, for model-size sweeps (``--grid model=tiny,small,base`` in
``scripts/sweep.py``) and for the paper-size configs.

A preset sets the shape only: width, depth, heads, FFN width (and a remat policy for the
sizes that need one). The vocabulary, embedding tie and maximum length stay those of the
config, since they follow its tokenizer and data.

Demo scale (2-core CPU, the demo's 2048-piece tokenizer and 16 x 128 batches): ``tiny``,
``small`` (the demo's own model) and ``base``, 0.15M / 0.79M / 2.66M non-embedding
parameters (18x from tiny to base); their step times are in README "Scaling studies".

Paper scale (Abbes et al. 2025, for accelerators): ``99m``, ``560m``, ``1b``.
"""

from __future__ import annotations

SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "head_dim", "remat")

MODEL_PRESETS = {
    "tiny": dict(d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=192),
    "small": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384),
    "base": dict(d_model=192, n_layers=6, n_heads=6, n_kv_heads=3, d_ff=576),
    "99m": dict(d_model=512, n_layers=16, n_heads=8, n_kv_heads=8, d_ff=1280),
    # remat "dots" (keep matmul outputs, recompute the rest): at "1b" on one H100 at
    # 16 x 2048 it was faster than "full" at more memory, and "none" ran out of memory
    # (README "Accelerator step" has the figures and the command)
    "560m": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=2560,
                 remat="dots"),
    "1b": dict(d_model=1792, n_layers=24, n_heads=28, n_kv_heads=28, d_ff=5120,
               remat="dots"),
}


def model_preset(name: str) -> dict:
    """``model.KEY -> value`` for every shape key of preset ``name`` (unset keys take
    their defaults: head_dim = d_model / n_heads, no remat)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of "
                         f"{', '.join(MODEL_PRESETS)} (cpt_jax/presets.py)")
    shape = {"head_dim": None, "remat": "none", **MODEL_PRESETS[name]}
    return {f"model.{k}": shape[k] for k in SHAPE_KEYS}

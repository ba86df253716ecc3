"""A sweep directory written from closed-form losses (no training): 3 model presets x
replay 0 / 0.25 / 0.5 x 2 seeds, for the scaling analysis and notebook tests.

Retained loss of rate r at training FLOPs C is a power law L_r(C) = A[r] (C / 1e13)^-0.3 + 3
exactly, seed 0 adding +NOISE and seed 1 -NOISE (so the seed means lie on the curves).
FLOPs: SIZE_FLOPS[size] x RATE_COST[r]. By construction (hand-computed in
test_scaling.py) replay 0 -> 0.25 beats the next model size at matched FLOPs and
0.25 -> 0.5 does not.
"""

import json
import os

from cpt_jax.presets import MODEL_PRESETS

SIZE_FLOPS = {"tiny": 1e12, "small": 4e12, "base": 1.6e13}
RATE_COST = {0.0: 1.0, 0.25: 1.25, 0.5: 1.6}
A = {0.0: 2.0, 0.25: 1.6, 0.5: 1.7}
B, C_INF, C_REF, NOISE = 0.3, 3.0, 1e13, 0.02


def retained(size, rate, seed=None):
    flops = SIZE_FLOPS[size] * RATE_COST[rate]
    noise = 0.0 if seed is None else (NOISE if seed == 0 else -NOISE)
    return A[rate] * (flops / C_REF) ** -B + C_INF + noise


def first_task_loss(size):
    return {"tiny": 5.0, "small": 4.5, "base": 4.2}[size]


def write_sweep(root) -> str:
    """Write the sweep under ``root``; returns its directory."""
    sweep = os.path.join(str(root), "synthetic_sweep")
    points = []
    for size in SIZE_FLOPS:
        for rate in RATE_COST:
            for seed in (0, 1):
                values = {"model": size, "replay.rate": f"{rate:g}", "seed": str(seed)}
                name = f"model-{size}_replay.rate-{rate:g}_seed-{seed}"
                points.append({"name": name, "workdir": name, "values": values,
                               "overrides": {}, "flops": None, "status": "done"})
                l0, ret = first_task_loss(size), retained(size, rate, seed)
                l1 = l0 - 1.0 - rate  # the new domain is learned a little worse with replay
                matrix = [[l0, 9.0], [ret, l1]]
                results = {
                    "domains": ["a", "b"], "tasks": ["a", "b"], "method": "replay",
                    "loss_matrix": matrix,
                    "eval_curve": [{"step": 0, "losses": {"a": 9.0, "b": 9.0}},
                                   {"step": 10, "losses": {"a": l0, "b": 9.0}},
                                   {"step": 20, "losses": {"a": ret, "b": l1}}],
                    "task_boundaries": [{"task": "a", "end_step": 10},
                                        {"task": "b", "end_step": 20}],
                    "compute": {"flops": SIZE_FLOPS[size] * RATE_COST[rate],
                                "replay_tokens": int(rate > 0)},
                    "config": {"seed": seed, "seq_len": 128, "replay": {"rate": rate},
                               "model": {"vocab_size": 2048, "max_seq_len": 256,
                                         "tie_embeddings": True, **MODEL_PRESETS[size]}}}
                os.makedirs(os.path.join(sweep, name), exist_ok=True)
                with open(os.path.join(sweep, name, "results.json"), "w") as f:
                    json.dump(results, f)
    with open(os.path.join(sweep, "index.json"), "w") as f:
        json.dump({"config": "synthetic", "match": "none", "points": points}, f)
    return sweep

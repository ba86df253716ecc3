"""Measure the train step: tokens/s, MFU, peak memory and compile time.

    python scripts/benchmark.py --config configs/llama_99m.py --config.global_batch=8 \
        --config.seq_len=512 [--steps 10 --warmup 2] [--json OUT.json]
    python scripts/benchmark.py --config configs/demo.py --methods plain,replay,agem,reptile
    python scripts/benchmark.py --config configs/demo.py --methods plain,replay,distill,der

With --methods, each method's median step time and train-state memory are reported
relative to plain training (no replay, no method) on the same global batch, in one run,
with the dot/convolution op count of each method's compiled step (between log steps, the
step timed, and at a log step): "replay" replays 25% of the rows in one pass over the
batch (the split into per-source gradients only at log steps); "agem" takes the split
pass at every step and projects; "distill" and "der" add their loss terms on the
replayed rows in that one pass (a teacher forward on those rows; stored top-k logits for
every replayed row); "reptile" adds the meta-update, whose meta step is timed separately
and amortised over --reptile_every steps; "mer" is replay + reptile.

With --generate, it instead times decoding (cpt_jax.eval.decode_speed): new tokens/s of
greedy ``cpt_jax.generate`` and its prefill time, and with --peer torch the same for
transformers' ``generate`` on the same weights and prompts (their tokens must agree).

With --prepare, it instead times data preparation (cpt_jax.data.prepare_bench): tokens/s
of the bare tokenizer on one thread and of ``prepare_domain`` with 1 and --workers workers
on the same documents (a --prepare_chars JSONL corpus built from the config's domains),
the ratios the preparation issue targets, hours per 100B tokens per host, and with
--prepare_memory_mb the peak memory of preparing a single-file text domain of that size.

With --checkpoint_dir, it instead times saving the whole train state (params and AdamW
moments) as a run checkpoint: blocking (the step loop waits for the write) against
asynchronous (the loop waits only for the device-to-host copy; the write goes on in the
background), medians over --checkpoint_repeats saves each.

With --replay_selection, it instead measures what gradient-coreset replay selection
(``cpt_jax.replay.features`` + ``cpt_jax.replay.coresets``) costs on the config: (a) rows/s
of the projected last-layer gradient feature step (``make_feature_step``, --feature_dim
features per row) against rows/s of the train step on the same batch, medians of
interleaved timed steps after warm-up, both compiled first; (b) seconds of ``craig`` and
``grad_match`` picking --coreset_size of --candidates rows from --feature_dim features
(Gaussian features: both run a fixed number of iterations, so their time does not depend
on the values), after compilation; (c) the bytes of a buffer of --coreset_size rows
(int32 tokens x (seq_len + 1), an int64 global row id and a float32 weight per row); (d) per
selection method, the cost ratio: (len(tasks) - 1) task boundaries x (featurising the
candidates + selecting) over the training compute of the config's whole run (the tasks'
steps, under the replay accounting, x the median train step). The issue's target is below 2%.

tokens/s is the median over `--steps` synchronised steps after `--warmup` steps. MFU is
model FLOPs per second over the matmul peak of this machine measured in the same run (a
jitted square matmul in the model's compute dtype on one device, times the device count).
Model FLOPs per token = 6 x (weight-matmul parameters, output projection included) +
12 x n_layers x seq_len x n_heads x head_dim for attention over the full L x L square
(PaLM's counting; the causal half is not subtracted). Works unchanged on CPU and GPU.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cpt_jax import atomic, cli, methods, pretrained
from cpt_jax import model as model_lib
from cpt_jax.eval.decode_speed import decode_speed
from cpt_jax.eval.step_profile import profile_step
from cpt_jax.train import checkpoint as checkpoint_lib
from cpt_jax.replay import coresets, features
from cpt_jax.replay.buffer import buffer_bytes
from cpt_jax.replay.rates import task_steps
from cpt_jax.train.setup import build_model
from cpt_jax.core.state import create_train_state
from cpt_jax.train.step import count_dot_ops, make_train_step

METHODS = ("plain", "replay", "agem", "distill", "der", "reptile", "mer")


def parse_args(argv):
    overrides, rest = cli.split_overrides(argv)
    ap = cli.config_parser("benchmark.py", __doc__)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--methods", default="", help="compare methods against plain training: "
                    "a comma-separated list of " + ", ".join(METHODS))
    ap.add_argument("--replay_rate", type=float, default=0.25,
                    help="replay fraction for the replay/agem/distill/der/mer methods")
    ap.add_argument("--reptile_every", type=int, default=500,
                    help="Reptile period to amortise the meta step over")
    ap.add_argument("--checkpoint_dir", default=None,
                    help="time run-checkpoint saves (blocking vs async) of the config's train "
                         "state in this scratch directory instead")
    ap.add_argument("--checkpoint_repeats", type=int, default=3,
                    help="saves per mode for --checkpoint_dir")
    ap.add_argument("--replay_selection", action="store_true",
                    help="time gradient-coreset selection instead: feature extraction vs the "
                         "train step, craig and grad_match, buffer bytes, cost per run")
    ap.add_argument("--feature_dim", type=int, default=256,
                    help="projected last-layer gradient features per row (--replay_selection)")
    ap.add_argument("--candidates", type=int, default=4096,
                    help="candidate rows M per task boundary (--replay_selection)")
    ap.add_argument("--coreset_size", type=int, default=512,
                    help="rows K the coreset keeps (--replay_selection)")
    ap.add_argument("--selection_repeats", type=int, default=3,
                    help="timed runs of each selection method (median reported)")
    ap.add_argument("--peer", choices=["torch"], default=None,
                    help="time the same Llama step in PyTorch + transformers against ours, "
                         "each in its own process, alternating (needs pip install -e "
                         "\".[peer]\")")
    ap.add_argument("--peer_rounds", type=int, default=2,
                    help="alternating rounds (ours, peer) of --peer, at least 2")
    ap.add_argument("--peer_malloc", choices=["system", "keep"], default="system",
                    help="the peer's process malloc: as PyTorch users run it (system), or "
                         "with the setting cpt_jax's training scripts take (keep: "
                         "cpt_jax.hostmem), to see what it does for the peer")
    ap.add_argument("--generate", action="store_true",
                    help="time decoding instead (cpt_jax.generate): new tokens/s of greedy "
                         "generate at the config's model, --decode_batch prompts of "
                         "--prompt_len tokens, --new_tokens each; with --peer torch also "
                         "transformers' generate on the same weights and prompts")
    ap.add_argument("--decode_batch", type=int, default=4, help="prompts per generate call")
    ap.add_argument("--prompt_len", type=int, default=32, help="prompt tokens (--generate)")
    ap.add_argument("--new_tokens", type=int, default=64, help="new tokens (--generate)")
    ap.add_argument("--prepare", action="store_true",
                    help="time data preparation instead (cpt_jax.data.prepare_bench): "
                         "tokens/s of the bare tokenizer (one thread) and of prepare_domain "
                         "with 1 and --workers workers on a corpus built from the config's "
                         "domains")
    ap.add_argument("--prepare_chars", type=float, default=30e6,
                    help="characters of the --prepare corpus")
    ap.add_argument("--workers", type=int, default=0,
                    help="workers of the second --prepare run (0: the machine's cores)")
    ap.add_argument("--prepare_memory_mb", type=float, default=0,
                    help="with --prepare, also the peak memory of preparing one text file "
                         "of this many MB (a single document)")
    ap.add_argument("--profile", action="store_true",
                    help="where the train step's time goes, op by op, from JAX's profiler "
                         "(cpt_jax.eval.step_profile): ms per step by kind of work "
                         "(matmul, copy, reduce, elementwise) and the top ops")
    ap.add_argument("--loader", action="store_true",
                    help="time the input pipeline instead: rows/s the run's loader delivers "
                         "(cpt_jax.eval.loader_throughput) against rows/s the train step consumes")
    args = ap.parse_args(rest)
    args.config = cli.load_config(args.config, overrides)
    args.methods = [m for m in args.methods.split(",") if m]
    return args


def matmul_peak_flops(dtype, device, n: int | None = None, repeats: int = 5) -> float:
    """Achievable FLOP/s of one device on a square matmul (the MFU denominator)."""
    if n is None:
        n = 8192 if device.platform == "gpu" or device.platform == "tpu" else 2048
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(k1, (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(k2, (n, n), dtype), device)
    f = jax.jit(lambda x, y: (x @ y).sum(dtype=jnp.float32))
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / min(times)


# Dense bfloat16 tensor-core peak from the vendor's datasheet, by device kind (substring):
# the MFU denominator papers quote (MaxText, PaLM), beside the measured matmul peak.
DATASHEET_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def datasheet_peak_flops(device) -> float | None:
    """The datasheet bf16 peak of a known accelerator, else None (CPUs have none)."""
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in DATASHEET_BF16_FLOPS.items() if k in kind), None)


def peak_memory_bytes(compiled) -> dict:
    """Device peak from the runtime where it reports one (GPU/TPU), else XLA's estimate."""
    out = {}
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    try:
        ma = compiled.memory_analysis()
        out["xla_estimate_bytes"] = int(ma.temp_size_in_bytes + ma.argument_size_in_bytes
                                        + ma.output_size_in_bytes - ma.alias_size_in_bytes)
    except Exception:  # not every backend implements memory_analysis
        pass
    out["host_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def random_batch(config, key):
    """Random token rows, with DER's stored top-k logits (valid on every row) when DER is
    selected: the arrays a DER run's batch carries."""
    B, L = config.global_batch, config.seq_len
    tokens = jax.random.randint(key, (B, L + 1), 0, config.model.vocab_size, jnp.int32)
    batch = {"tokens": np.asarray(tokens), "segment_ids": np.ones((B, L + 1), np.int32)}
    if "der" in [m.name for m in methods.selected(config)]:
        k = config.method.der.k
        batch.update(der_values=np.zeros((B, L, k), np.float32),
                     der_indices=np.zeros((B, L, k), np.int32), der_valid=np.ones(B, np.int32))
    return batch


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def timed_steps(compiled, state, batch, steps: int):
    """Run `steps` synchronised steps; returns (state, last metrics, per-step seconds)."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return state, metrics, times


def build_state(config):
    """(placement, composed methods, schedule, fresh sharded state), as a run builds them
    (``setup.build_model``) for tasks of any length: only speed counts."""
    placement, composition, schedule = build_model(config, [1000])
    state, _ = create_train_state(placement.mcfg, composition.tx, placement.mesh,
                                  placement.rules, jax.random.key(config.seed),
                                  teacher=composition.teacher)
    return placement, composition, schedule, state


def prepare(config, n_replay: int = 0, stats: bool = False) -> dict:
    """Build the state and compile the step of `config` for `n_replay` replayed rows, as a
    run takes it: a step that does not log (``stats=False``: one pass over the batch unless
    a selected method needs the split pass) or a log step (``stats=True``)."""
    placement, composition, schedule, state = build_state(config)
    step = make_train_step(placement, composition.tx, config.microbatches, schedule,
                           loss_fn=composition.loss_fn,  # the loss a run trains with
                           split_grads=composition.split_grads)
    batch = random_batch(config, jax.random.key(1))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, n_replay, stats=stats).compile()
    return {"mcfg": placement.mcfg, "mesh": placement.mesh, "split_grads": composition.split_grads, "state": state, "batch": batch, "compiled": compiled,
            "compile_s": time.perf_counter() - t0, "step": step, "n_replay": n_replay}


def benchmark(config, steps: int, warmup: int) -> dict:
    """Time the train step of `config`: median of `steps` synchronised steps after warm-up."""
    p = prepare(config)
    mcfg, mesh, state, batch = p["mcfg"], p["mesh"], p["state"], p["batch"]
    compiled, compile_s = p["compiled"], p["compile_s"]
    state, metrics, _ = timed_steps(compiled, state, batch, warmup + 1)
    state, metrics, times = timed_steps(compiled, state, batch, steps)

    step_s = statistics.median(times)
    tokens_per_step = config.global_batch * config.seq_len
    tok_s = tokens_per_step / step_s
    flops_tok = mcfg.flops_per_token(config.seq_len)
    dev = jax.devices()[0]
    peak = matmul_peak_flops(jnp.dtype(mcfg.dtype), dev) * jax.device_count()
    return {
        "platform": dev.platform, "device_kind": dev.device_kind,
        "devices": jax.device_count(), "mesh": dict(mesh.shape),
        "params": mcfg.num_params(), "global_batch": config.global_batch,
        "seq_len": config.seq_len, "microbatches": config.microbatches,
        "dtype": mcfg.dtype, "remat": mcfg.remat,
        "compile_s": round(compile_s, 2), "step_s_median": step_s,
        "tokens_per_s": tok_s, "model_flops_per_token": flops_tok,
        "model_tflops_per_s": tok_s * flops_tok / 1e12,
        "matmul_peak_tflops_per_s": peak / 1e12, "mfu": tok_s * flops_tok / peak,
        **({"mfu_datasheet_bf16": tok_s * flops_tok / (sheet * jax.device_count())}
           if (sheet := datasheet_peak_flops(dev)) else {}),
        "attention": model_lib.resolve_attention(mcfg, config.seq_len),
        "final_loss": float(metrics["loss"]),
        "param_bytes": tree_bytes(state.params), "opt_state_bytes": tree_bytes(state.opt_state),
        **peak_memory_bytes(compiled),
    }


def write_peer_job(config, mcfg, params, tokens, job: str) -> None:
    """What the peer's own process reads (``cpt_jax.peer_torch``): our weights as a Hugging
    Face checkpoint ``JOB/model``, the batch ``JOB/tokens.npy``, the optimizer
    ``JOB/optim.json``."""
    from cpt_jax.hf import save_hf_llama

    save_hf_llama(mcfg, jax.device_get(params), os.path.join(job, "model"), dtype="float32")
    np.save(os.path.join(job, "tokens.npy"), tokens)
    o = config.optim
    atomic.write_json(os.path.join(job, "optim.json"), {
        k: float(o[k]) for k in ("lr", "b1", "b2", "eps", "weight_decay", "clip_norm")})


def compare_peer(config, steps: int, warmup: int, rounds: int = 2,
                 peer_malloc: str = "system") -> dict:
    """Our train step against the PyTorch peer (``cpt_jax.peer_torch``) on the same batch,
    from the same initial weights, with the same thread count.

    First, in this process, one step of each from the same weights: the first step's
    losses must agree (the peer is the same model), or the benchmark stops. Then each
    framework is timed alone in a process of its own, as a user runs it, alternating
    (ours, peer, ours, peer, ...) for ``rounds`` rounds (at least 2): each process takes
    ``warmup + 1`` untimed steps and reports the median of ``steps`` timed ones. Reported:
    the median and range over the rounds of each side's tokens/s and of the per-round ratio
    ours / peer. (Sharing one process slowed both sides by 15-25%, unevenly.)"""
    import pickle
    import subprocess
    import tempfile

    from cpt_jax import peer_torch

    if rounds < 2:
        raise cli.UserError(f"--peer_rounds={rounds}: alternate at least 2 rounds")
    user_omp = os.environ.get("OMP_WAIT_POLICY")  # require() makes this process's passive
    peer_torch.require()
    p = prepare(config)
    compiled, state, batch, mcfg = p["compiled"], p["state"], p["batch"], p["mcfg"]
    tokens = config.global_batch * config.seq_len
    flops_tok = mcfg.flops_per_token(config.seq_len)
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if user_omp is not None:
        env["OMP_WAIT_POLICY"] = user_omp
    root = os.path.dirname(os.path.dirname(os.path.abspath(peer_torch.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [x for x in [env.get("PYTHONPATH")] if x])
    peer_env = {**env, peer_torch.MALLOC_ENV: peer_malloc}
    with tempfile.TemporaryDirectory() as job:
        write_peer_job(config, mcfg, state.params, batch["tokens"], job)
        with open(os.path.join(job, "config.pkl"), "wb") as f:
            pickle.dump(config, f)
        peer = peer_torch.TorchStep(config, mcfg, None, batch["tokens"],
                                    hf_dir=os.path.join(job, "model"))
        state, metrics, _ = timed_steps(compiled, state, batch, 1)  # the donated state moves on
        first = {"ours": float(metrics["loss"]), "torch": peer.timed()[1]}
        if not np.isclose(first["ours"], first["torch"], rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"the peer is not the same model: first-step loss "
                               f"{first['torch']} (torch) vs {first['ours']} (ours)")
        del peer, state, compiled, p  # the timed processes get the memory

        def alone(side: str) -> dict:
            out = os.path.join(job, "times.json")
            cmd = ([sys.executable, os.path.abspath(__file__), "--peer_worker"]
                   if side == "ours" else [sys.executable, "-m", "cpt_jax.peer_torch"])
            subprocess.run(cmd + [job, str(steps), str(warmup), out], check=True,
                           env=env if side == "ours" else peer_env)
            with open(out) as f:
                r = json.load(f)
            os.remove(out)
            r["tokens_per_s"] = tokens / r["step_s_median"]
            return r

        per_round = []
        for _ in range(rounds):
            ours = alone("ours")
            theirs = alone("torch")
            per_round.append({"ours": ours, "torch": theirs,
                              "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"]})
    peak = matmul_peak_flops(jnp.dtype(mcfg.dtype), jax.devices()[0]) * jax.device_count()

    def spread(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out = {"params": mcfg.num_params(), "global_batch": config.global_batch,
           "seq_len": config.seq_len, "threads": peer_torch.cpu_threads(),
           "first_step_loss": first, "matmul_peak_tflops_per_s": peak / 1e12,
           "mode": "separate processes, alternating", "rounds": per_round,
           "peer_malloc": peer_malloc,
           "steps_per_round": steps, "warmup": warmup}
    for name in ("ours", "torch"):
        tok_s = [r[name]["tokens_per_s"] for r in per_round]
        out[name] = {"tokens_per_s": statistics.median(tok_s),
                     "tokens_per_s_range": [min(tok_s), max(tok_s)],
                     "step_s_median": tokens / statistics.median(tok_s),
                     "mfu": statistics.median(tok_s) * flops_tok / peak}
    ratio = spread([r["ratio"] for r in per_round])
    out["speed_ratio"], out["speed_ratio_range"] = ratio["median"], [ratio["min"], ratio["max"]]
    print(f"{'':<16} {'ours (JAX)':>12} {'PyTorch + HF':>13}")
    print(f"{'tokens_per_s':<16} {out['ours']['tokens_per_s']:>12.0f} "
          f"{out['torch']['tokens_per_s']:>13.0f}   (median over rounds)")
    for i, name in enumerate(("min", "max")):
        print(f"{'  ' + name:<16} {out['ours']['tokens_per_s_range'][i]:>12.0f} "
              f"{out['torch']['tokens_per_s_range'][i]:>13.0f}")
    print(f"{'mfu':<16} {out['ours']['mfu']:>12.3f} {out['torch']['mfu']:>13.3f}")
    print(f"{'first-step loss':<16} {first['ours']:>12.5f} {first['torch']:>13.5f}")
    print(f"speed ratio (ours / PyTorch tokens/s, per round): median {out['speed_ratio']:.3f}, "
          f"range {ratio['min']:.3f}-{ratio['max']:.3f}  [{mcfg.num_params() / 1e6:.1f}M "
          f"params, {config.global_batch} x {config.seq_len}, {out['threads']} threads, "
          f"{rounds} alternating rounds of one process per framework, median of {steps} "
          f"steps after {warmup + 1} in each]")
    return out


def peer_worker(job: str, steps: int, warmup: int, out: str) -> None:
    """Our side of ``compare_peer``, alone in its own process: the config pickled in
    ``job/config.pkl``, the same batch and initial weights (the same seeds)."""
    import pickle

    with open(f"{job}/config.pkl", "rb") as f:
        config = pickle.load(f)
    p = prepare(config)
    state, _, _ = timed_steps(p["compiled"], p["state"], p["batch"], warmup + 1)
    state, _, times = timed_steps(p["compiled"], state, p["batch"], steps)
    atomic.write_json(out, {"step_s_median": statistics.median(times), "step_s": times})


def method_config(config, method: str, rate: float, reptile_every: int = 500):
    """(config, n_replay, Reptile period to amortise over or None) for one method."""
    c = config.copy_and_resolve_references()
    n_replay = int(round(rate * c.global_batch))
    if method == "plain":
        return c, 0, None
    if method == "replay":
        return c, n_replay, None
    if method == "agem":
        c.method.name = "agem"
        return c, n_replay, None
    if method == "distill":
        c.method.name = "replay+distill"
        c.method.distill.weight = 1.0
        return c, n_replay, None
    if method == "der":
        c.method.name = "replay+der"
        c.method.der.weight = 0.5
        return c, n_replay, None
    if method in ("reptile", "mer"):
        c.method.name = "replay+reptile"
        c.method.reptile.periods = [{"every": 2, "meta_lr": 0.1}]  # period 2: time both kinds
        return c, (n_replay if method == "mer" else 0), reptile_every
    raise cli.UserError(f"--methods: unknown method {method!r}; use {', '.join(METHODS)}")


def compare_methods(config, methods, steps, warmup, replay_rate: float = 0.25,
                    reptile_every: int = 500) -> dict:
    """Compile every method, then time them interleaved, one step each per round, so that
    machine noise and drift hit all methods alike; ratios are of medians."""
    names = ["plain"] + [m for m in methods if m != "plain"]
    runs = {}
    for m in names:
        c, n_replay, every = method_config(config, m, replay_rate, reptile_every)
        runs[m] = r = prepare(c, n_replay)  # timed: the step a run takes between log steps
        r["every"] = every
        r["dot_ops"] = count_dot_ops(r["compiled"])
        # a log step takes the split pass (gradient statistics) wherever there is replay;
        # a method that splits every step (A-GEM) has no other variant
        r["dot_ops_log_step"] = (count_dot_ops(r["step"].lower(
            r["state"], r["batch"], n_replay, stats=True).compile())
            if n_replay and not r["split_grads"] else r["dot_ops"])
        runs[m]["state"], _, _ = timed_steps(runs[m]["compiled"], runs[m]["state"],
                                             runs[m]["batch"], warmup + 1)
        runs[m]["times"] = []
    for _ in range(2 * steps):  # an even count: Reptile (period 2) gets inner and meta steps
        for m in names:
            r = runs[m]
            r["state"], _, t = timed_steps(r["compiled"], r["state"], r["batch"], 1)
            r["times"] += t
    results = {}
    done = warmup + 1
    for m in names:
        r, times = runs[m], runs[m]["times"]
        out = {"compile_s": r["compile_s"], "param_bytes": tree_bytes(r["state"].params),
               "opt_state_bytes": tree_bytes(r["state"].opt_state),
               "teacher_bytes": tree_bytes(r["state"].teacher),  # distillation's snapshot
               "n_replay": r["n_replay"], "dot_ops": r["dot_ops"],
               "dot_ops_log_step": r["dot_ops_log_step"]}
        if r["every"]:  # steps done+1, done+2, ...: even counts are meta steps (period 2)
            inner = [t for i, t in enumerate(times, start=done + 1) if i % 2 == 1]
            meta = [t for i, t in enumerate(times, start=done + 1) if i % 2 == 0]
            t_in, t_meta = statistics.median(inner), statistics.median(meta)
            k = r["every"]
            out.update(inner_step_s=t_in, meta_step_s=t_meta, amortised_over=k,
                       step_s_median=((k - 1) * t_in + t_meta) / k)
        else:
            out["step_s_median"] = statistics.median(times)
        results[m] = out
    base = results["plain"]
    print(f"{'method':<9} {'step_s':>9} {'time_ratio':>10} {'state_bytes':>12} "
          f"{'extra_param_copies':>18} {'dot_ops':>7} {'dot_ops_log_step':>16}")
    for m, r in results.items():
        r["time_ratio"] = r["step_s_median"] / base["step_s_median"]
        extra = r["opt_state_bytes"] + r["teacher_bytes"] - base["opt_state_bytes"]
        r["extra_param_copies"] = extra / r["param_bytes"]
        print(f"{m:<9} {r['step_s_median']:>9.4f} {r['time_ratio']:>10.3f} "
              f"{r['opt_state_bytes'] + r['param_bytes'] + r['teacher_bytes']:>12d} "
              f"{r['extra_param_copies']:>18.2f}"
              f" {r['dot_ops']:>7d} {r['dot_ops_log_step']:>16d}")
    print("dot_ops: dot/convolution instructions in the compiled HLO of the timed step (a "
          "step between log steps); dot_ops_log_step: of a log step (the split pass, with "
          "the gradient statistics)")
    return results


def checkpoint_times(config, directory: str, repeats: int) -> dict:
    """Median seconds the training loop is blocked by one run-checkpoint save, blocking vs
    asynchronous, and the asynchronous save's time until it is on disk."""
    import shutil

    state = build_state(config)[3]
    jax.block_until_ready(state)
    out = {"state_bytes": tree_bytes(state.params) + tree_bytes(state.opt_state)}
    for mode in ("blocking", "async"):
        path = f"{directory.rstrip('/')}/{mode}"
        shutil.rmtree(path, ignore_errors=True)
        ckpt = checkpoint_lib.RunCheckpointer(path, keep=1, async_save=mode == "async")
        blocked, total = [], []
        for step in range(1, repeats + 1):
            t0 = time.perf_counter()
            ckpt.save(step, state, {"step": step}, {})
            blocked.append(time.perf_counter() - t0)
            ckpt.wait()
            total.append(time.perf_counter() - t0)
        ckpt.close()
        shutil.rmtree(path, ignore_errors=True)
        out[f"{mode}_blocked_s"] = statistics.median(blocked)
        out[f"{mode}_total_s"] = statistics.median(total)
    out["write_GB_per_s"] = out["state_bytes"] / out["blocking_total_s"] / 1e9
    return out


def replay_selection(config, steps: int, warmup: int, feature_dim: int = 256,
                     candidates: int = 4096, coreset_size: int = 512,
                     selection_repeats: int = 3) -> dict:
    """The cost of gradient-coreset replay selection on ``config`` (see the module doc)."""
    if not 1 <= coreset_size <= candidates:
        raise cli.UserError(f"--coreset_size={coreset_size} must be in [1, --candidates="
                            f"{candidates}]")
    placement, composition, schedule, state = build_state(config)
    mcfg = placement.mcfg
    step = make_train_step(placement, composition.tx, config.microbatches, schedule,
                           loss_fn=composition.loss_fn)
    try:
        fstep = features.make_feature_step(placement, feature_dim, config.seed)
    except ValueError as e:
        raise cli.UserError(f"--feature_dim: {e}") from e
    batch = random_batch(config, jax.random.key(1))
    t0 = time.perf_counter()
    train_c = step.lower(state, batch).compile()
    train_compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    feat_c = fstep.lower(state.params, batch).compile()
    feature_compile_s = time.perf_counter() - t0

    def featurise(params):
        return feat_c(params, batch, fstep.projection)

    state, _, _ = timed_steps(train_c, state, batch, warmup + 1)
    for _ in range(warmup + 1):
        jax.block_until_ready(featurise(state.params))
    train_times, feature_times = [], []
    for _ in range(steps):  # interleaved, so machine noise hits both alike
        state, _, t = timed_steps(train_c, state, batch, 1)
        train_times += t
        t0 = time.perf_counter()
        f = jax.block_until_ready(featurise(state.params))
        feature_times.append(time.perf_counter() - t0)
    B = config.global_batch
    train_s, feature_s = statistics.median(train_times), statistics.median(feature_times)
    out = {
        "platform": jax.devices()[0].platform, "devices": jax.device_count(),
        "params": mcfg.num_params(), "d_model": mcfg.d_model, "vocab_size": mcfg.vocab_size,
        "global_batch": B, "seq_len": config.seq_len, "dtype": mcfg.dtype,
        "feature_dim": feature_dim,
        "feature_factors": list(features.factor_dim(mcfg.d_model, mcfg.vocab_size,
                                                    feature_dim)),
        "features_finite": bool(np.isfinite(np.asarray(f)).all()),
        "train_compile_s": round(train_compile_s, 2),
        "feature_compile_s": round(feature_compile_s, 2),
        "train_step_s": train_s, "feature_step_s": feature_s,
        "train_rows_per_s": B / train_s, "feature_rows_per_s": B / feature_s,
        "feature_vs_train_speed": train_s / feature_s,
        **{f"feature_step_{k}": v for k, v in peak_memory_bytes(feat_c).items()},
    }

    # (b) selection time after compilation, on Gaussian candidate features
    feats = jax.random.normal(jax.random.key(2), (candidates, feature_dim), jnp.float32)
    out.update(candidates=candidates, coreset_size=coreset_size)
    select = {}
    for name, fn in (("craig", coresets.craig), ("grad_match", coresets.grad_match)):
        t0 = time.perf_counter()
        compiled = fn.lower(feats, coreset_size).compile()
        out[f"{name}_compile_s"] = round(time.perf_counter() - t0, 2)
        times = []
        for _ in range(max(1, selection_repeats)):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(feats))
            times.append(time.perf_counter() - t0)
        select[name] = out[f"{name}_select_s"] = statistics.median(times)

    # (c) the buffer the coreset leaves: tokens, a global row id and a weight per row
    row_bytes = buffer_bytes(1, config.seq_len)
    out["buffer_bytes"] = buffer_bytes(coreset_size, config.seq_len)
    out["buffer_bytes_per_row"] = row_bytes

    # (d) per task boundary: featurise the candidates, then select; over the run's training
    tasks = [dict(t) for t in config.tasks]
    out["extract_candidates_s"] = candidates / out["feature_rows_per_s"]
    out["boundaries"] = max(len(tasks) - 1, 0)
    if out["boundaries"]:
        out["run_steps"] = sum(task_steps(config, tasks))  # as the run takes them
        out["run_train_s"] = out["run_steps"] * train_s
        for name, sel_s in select.items():
            per = out["extract_candidates_s"] + sel_s
            out[f"{name}_boundary_s"] = per
            out[f"{name}_cost_ratio"] = out["boundaries"] * per / out["run_train_s"]
    else:
        out["cost_ratio_note"] = "config has fewer than 2 tasks: no task boundary to select at"

    print(f"{'step':<22} {'median_s':>10} {'rows/s':>10}")
    print(f"{'train':<22} {train_s:>10.4f} {out['train_rows_per_s']:>10.1f}")
    print(f"{'features (dim ' + str(feature_dim) + ')':<22} {feature_s:>10.4f} "
          f"{out['feature_rows_per_s']:>10.1f}")
    print(f"\nselect K={coreset_size} of M={candidates} (d'={feature_dim})")
    print(f"{'method':<11} {'select_s':>9} {'boundary_s':>11} {'cost_ratio':>11}")
    for name, sel_s in select.items():
        per = out.get(f"{name}_boundary_s")
        ratio = out.get(f"{name}_cost_ratio")
        print(f"{name:<11} {sel_s:>9.3f} " + (f"{per:>11.3f} {100 * ratio:>10.3f}%"
                                             if ratio is not None else f"{'n/a':>11} {'n/a':>11}"))
    print(f"\nbuffer of K rows: {out['buffer_bytes']} bytes ({row_bytes} per row)")
    if out["boundaries"]:
        print(f"run: {out['run_steps']} steps x {train_s:.4f} s = {out['run_train_s']:.1f} s "
              f"of training, {out['boundaries']} boundaries")
    return out


def loader_vs_step(config, steps: int, warmup: int) -> dict:
    """Rows/s of the input pipeline (synthetic packed sources written to a scratch
    directory, the run's sampler and loader, 25% replay) against rows/s of the train step
    on the same batch shape; the ratio should be well above 1 (the issue's target: 20)."""
    import tempfile

    from cpt_jax.eval.loader_throughput import loader_rows_per_s

    with tempfile.TemporaryDirectory() as tmp:
        loader = loader_rows_per_s(config, tmp, steps=max(steps, 50))
    step = benchmark(config, steps, warmup)
    step_rows = config.global_batch / step["step_s_median"]
    out = {"loader": loader, "step_rows_per_s": step_rows, "step_s_median": step["step_s_median"],
           "ratio": loader["rows_per_s"] / step_rows}
    print(f"loader {loader['rows_per_s']:.0f} rows/s ({loader['replay_rows']} of "
          f"{config.global_batch} rows replayed), step {step_rows:.1f} rows/s: the loader is "
          f"{out['ratio']:.0f}x faster than the step consumes")
    return out


def prepare_speed(args) -> dict:
    """``--prepare``: data preparation's tokens/s and memory (cpt_jax.data.prepare_bench)."""
    import tempfile

    from cpt_jax.data import prepare, prepare_bench
    from cpt_jax.train.setup import load_tokenizer

    config = args.config
    workers = prepare.default_workers(args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(config, [dict(d) for d in config.data.domains], tmp)
        result = prepare_bench.prepare_speed(config, tok, tmp, int(args.prepare_chars),
                                             workers)
        if args.prepare_memory_mb:
            result["memory"] = prepare_bench.prepare_memory(config, tok, tmp,
                                                            args.prepare_memory_mb)
    return result


def step_profile(config, steps: int, warmup: int, peer: str | None = None) -> dict:
    """``profile_step`` of the config's train step (no replay, a step that does not log),
    after ``warmup`` untraced steps; with ``peer="torch"`` also the PyTorch peer's step
    profiled by torch's profiler in a process of its own, by the same kinds of work
    (``cpt_jax.peer_torch.profile_alone``), from the same weights and batch."""
    import subprocess
    import tempfile

    from cpt_jax import peer_torch

    r = prepare(config)
    theirs = None
    if peer:
        peer_torch.require()
        with tempfile.TemporaryDirectory() as job:
            write_peer_job(config, r["mcfg"], r["state"].params, r["batch"]["tokens"], job)
            out = os.path.join(job, "profile.json")
            subprocess.run([sys.executable, "-m", "cpt_jax.peer_torch", "--profile", job,
                            str(max(steps, 1)), str(warmup), out], check=True)
            with open(out) as f:
                theirs = json.load(f)
    state, _, _ = timed_steps(r["compiled"], r["state"], r["batch"], max(warmup, 1))
    box = [state]

    def one():
        box[0], metrics = r["compiled"](box[0], r["batch"])
        jax.block_until_ready((box[0], metrics))

    out = profile_step(one, r["compiled"].as_text(), steps=max(steps, 1))
    result = {"params": r["mcfg"].num_params(), "global_batch": config.global_batch,
              "seq_len": config.seq_len, "devices": jax.device_count(), **out}
    if theirs is not None:
        result = {"ours": result, "torch": theirs}
    return result


def main(argv) -> int:
    if argv[:1] == ["--peer_worker"]:  # compare_peer's timed process of our step
        job, steps, warmup, out = argv[1:5]
        peer_worker(job, int(steps), int(warmup), out)
        return 0
    args = parse_args(argv)
    logging.set_verbosity(logging.ERROR)  # orbax logs every save
    if args.generate:
        result = decode_speed(pretrained.model_config(args.config),
                              batch=args.decode_batch, prompt_len=args.prompt_len,
                              new_tokens=args.new_tokens, repeats=max(1, args.steps // 3),
                              peer=args.peer)
        print(json.dumps(result, indent=1))
    elif args.peer and not args.profile:  # prints its own table
        result = compare_peer(args.config, args.steps, args.warmup, args.peer_rounds,
                              args.peer_malloc)
    elif args.prepare:
        result = prepare_speed(args)
        print(json.dumps(result, indent=1))
    elif args.profile:
        result = step_profile(args.config, args.steps, args.warmup, args.peer)
        print(json.dumps(result, indent=1))
    elif args.loader:  # prints its own line
        result = loader_vs_step(args.config, args.steps, args.warmup)
    elif args.replay_selection:  # prints its own table
        result = replay_selection(args.config, args.steps, args.warmup, args.feature_dim,
                                  args.candidates, args.coreset_size, args.selection_repeats)
    elif args.methods and not args.checkpoint_dir:  # prints its own table
        result = compare_methods(args.config, args.methods, args.steps, args.warmup,
                                 args.replay_rate, args.reptile_every)
    else:
        result = (checkpoint_times(args.config, args.checkpoint_dir, args.checkpoint_repeats)
                  if args.checkpoint_dir else benchmark(args.config, args.steps, args.warmup))
        width = max(map(len, result))
        for k, v in result.items():
            v = f"{v:.4g}" if isinstance(v, float) else v
            print(f"{k:<{width}}  {v}")
    if args.json:
        atomic.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))

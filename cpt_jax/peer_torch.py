"""The same Llama train step in PyTorch with Hugging Face transformers: the speed peer of
``scripts/benchmark.py --peer torch``.

The peer is ``LlamaForCausalLM`` (eager PyTorch, its default attention) loaded from our
own initial parameters (exported with ``cpt_jax.hf.save_hf_llama``), so both sides start
from the same weights and the first step's losses must agree: a check that the shapes,
RoPE and norms are the same model. A step is what ours does: forward, float32
cross-entropy over the shifted tokens, backward, global-norm clipping and AdamW with the
config's betas, eps and weight decay. Needs the optional extra ``pip install -e ".[peer]"``.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from cpt_jax import hostmem  # ctypes only: no JAX in the peer's process


def require(shared: bool = True):
    """Import torch and transformers, or say how to install them.

    ``shared``: the process also runs our step (the benchmark's first-step check).
    OpenMP threads that busy-wait after each torch op would take the cores from our step
    there, so they are made to sleep (``OMP_WAIT_POLICY=PASSIVE``, read when torch loads
    its OpenMP runtime; an explicit setting is kept). A process of the peer's own
    (``shared=False``) keeps OpenMP's default, as a PyTorch user runs it."""
    if shared:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
        import transformers
    except ImportError:
        raise ValueError('--peer torch needs PyTorch and transformers: pip install -e ".[peer]"'
                         ' (CPU wheels are enough)') from None
    return torch, transformers


def cpu_threads() -> int:
    """Cores this process may use: the thread count both sides run with."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class TorchStep:
    """One AdamW train step of ``LlamaForCausalLM`` on a fixed [B, L + 1] token batch."""

    def __init__(self, config, mcfg, params, tokens: np.ndarray, hf_dir: str | None = None,
                 shared: bool = True):
        """From our ``params`` (exported to a scratch directory), or with ``hf_dir`` from a
        checkpoint already exported there (``params`` and ``mcfg`` unused: a process that
        times the peer alone need not run JAX). ``config`` needs only ``optim``;
        ``shared``: see ``require``."""
        torch, transformers = require(shared)

        self.torch = torch
        torch.set_num_threads(cpu_threads())
        transformers.utils.logging.disable_progress_bar()
        if hf_dir is not None:
            self.model = transformers.LlamaForCausalLM.from_pretrained(
                str(hf_dir), torch_dtype=torch.float32)
        else:
            from cpt_jax.hf import save_hf_llama

            with tempfile.TemporaryDirectory() as tmp:
                path = save_hf_llama(mcfg, params, os.path.join(tmp, "model"), dtype="float32")
                self.model = transformers.LlamaForCausalLM.from_pretrained(
                    str(path), torch_dtype=torch.float32)
        self.model.train()
        o = config.optim
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2),
                                     eps=o.eps, weight_decay=o.weight_decay)
        self.clip = float(o.clip_norm)
        tokens = torch.from_numpy(np.asarray(tokens, np.int64))
        self.inputs, self.labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def __call__(self) -> float:
        """One step; returns its loss (a host float, so the step has finished)."""
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(input_ids=self.inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), self.labels.reshape(-1))
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return float(loss.detach())

    def timed(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        loss = self()
        return time.perf_counter() - t0, loss


def _warm_step(job_dir: str, warmup: int) -> TorchStep:
    """The peer's step of a job the benchmark wrote (the checkpoint ``JOB/model``, the
    batch ``JOB/tokens.npy``, the optimizer ``JOB/optim.json``), in a process of its own
    that never imports JAX, after ``warmup + 1`` untimed steps."""
    import json
    import types

    with open(os.path.join(job_dir, "optim.json")) as f:
        config = types.SimpleNamespace(optim=types.SimpleNamespace(**json.load(f)))
    tokens = np.load(os.path.join(job_dir, "tokens.npy"))
    step = TorchStep(config, None, None, tokens, hf_dir=os.path.join(job_dir, "model"),
                     shared=False)
    for _ in range(warmup + 1):
        step()
    return step


def time_alone(job_dir: str, steps: int, warmup: int) -> dict:
    """The peer's step timed in a process of its own (``python -m cpt_jax.peer_torch JOB
    STEPS WARMUP OUT``, run by ``benchmark.py --peer torch``): ``steps`` timed steps after
    ``_warm_step``."""
    import statistics

    step = _warm_step(job_dir, warmup)
    times = [step.timed()[0] for _ in range(steps)]
    return {"step_s_median": statistics.median(times), "step_s": times,
            "threads": cpu_threads()}


# aten ops by the kind of work, as cpt_jax.eval.step_profile sorts XLA's
_MATMUL = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul",
           "aten::linear", "aten::_scaled_dot_product", "aten::scaled_dot_product")
_COPY = ("aten::copy_", "aten::contiguous", "aten::clone", "aten::cat", "aten::_to_copy",
         "aten::to", "aten::index", "aten::embedding", "aten::transpose", "aten::t",
         "aten::expand", "aten::reshape", "aten::view", "aten::slice", "aten::select",
         "aten::stack", "aten::empty", "aten::zeros", "aten::new_zeros", "aten::fill_",
         "aten::zero_", "aten::gather", "aten::scatter", "aten::index_add_",
         "aten::embedding_dense_backward")
_REDUCE = ("aten::sum", "aten::mean", "aten::norm", "aten::linalg_vector_norm", "aten::amax",
           "aten::max", "aten::_foreach_norm")


def op_kind(name: str) -> str:
    """matmul, copy, reduce, elementwise (other aten ops) or other (framework code)."""
    if not name.startswith("aten::"):
        return "other"
    for kind, prefixes in (("matmul", _MATMUL), ("copy", _COPY), ("reduce", _REDUCE)):
        if any(name == p or name.startswith(p + "_") or name.startswith(p + ".")
               or (p.endswith("product") and name.startswith(p)) for p in prefixes):
            return kind
    return "elementwise"


def profile_alone(job_dir: str, steps: int, warmup: int, top: int = 15) -> dict:
    """The peer's step under torch's profiler, in a process of its own (``python -m
    cpt_jax.peer_torch --profile JOB STEPS WARMUP OUT``): each op's self time (its own
    work, children excluded) per step, by kind, as ``step_profile`` reports ours."""
    step = _warm_step(job_dir, warmup)
    torch = step.torch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
    per_op = {e.key: e.self_cpu_time_total / 1000.0 / steps for e in prof.key_averages()}
    by_kind = {k: 0.0 for k in ("matmul", "copy", "reduce", "elementwise", "other")}
    for name, ms in per_op.items():
        by_kind[op_kind(name)] += ms
    op_ms = sum(per_op.values())
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return {"step_ms": wall / steps * 1000.0, "op_ms": op_ms, "by_kind": by_kind,
            "threads": cpu_threads(),
            "top": [{"op": n, "kind": op_kind(n), "ms": ms, "share": ms / op_ms}
                    for n, ms in ranked]}


# "keep": the peer's process takes cpt_jax.hostmem's malloc setting, as our scripts do
MALLOC_ENV = "CPT_JAX_PEER_MALLOC"

if __name__ == "__main__":
    import json
    import sys

    if os.environ.get(MALLOC_ENV) == "keep":
        hostmem.keep_freed_memory()
    profiling = sys.argv[1:2] == ["--profile"]
    job, n_steps, n_warmup, out = sys.argv[2:6] if profiling else sys.argv[1:5]
    result = (profile_alone if profiling else time_alone)(job, int(n_steps), int(n_warmup))
    with open(out, "w") as f:
        json.dump(result, f)

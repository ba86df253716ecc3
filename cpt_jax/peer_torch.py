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


def require():
    """Import torch and transformers, or say how to install them.

    OpenMP threads that busy-wait after each torch op would take the cores from our step
    when the two are interleaved, so they are made to sleep (``OMP_WAIT_POLICY=PASSIVE``,
    read when torch loads its OpenMP runtime; an explicit setting is kept)."""
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

    def __init__(self, config, mcfg, params, tokens: np.ndarray):
        torch, transformers = require()
        from cpt_jax.hf import save_hf_llama

        self.torch = torch
        torch.set_num_threads(cpu_threads())
        transformers.utils.logging.disable_progress_bar()
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

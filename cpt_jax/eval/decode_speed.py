"""Decode speed of ``cpt_jax.generate`` (``scripts/benchmark.py --generate``), and of
transformers' ``generate`` on the same weights and prompts (``--peer torch``).

Both sides decode greedily from the same random-initialised model (ours exported with
``save_hf_llama``; transformers runs alone in its own process), ``batch`` prompts of
``prompt_len`` random tokens, exactly ``new_tokens`` new tokens each (no EOS), and must produce the same tokens: a check that
the two run the same model. Reported: new tokens per second of a whole ``generate`` call
(prefill included), the median of ``repeats`` calls after one untimed call (which
compiles ours), and the prefill-only time (one new token).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from cpt_jax import model as model_lib
from cpt_jax import peer_torch
from cpt_jax.generate import generate
from cpt_jax.hf import save_hf_llama


def _median_seconds(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_speed(mcfg: model_lib.LlamaConfig, *, batch: int, prompt_len: int,
                 new_tokens: int, repeats: int = 3, peer: str | None = None,
                 seed: int = 0) -> dict:
    params = model_lib.init_params(mcfg, jax.random.key(seed))
    prompts = np.random.default_rng(seed).integers(
        0, mcfg.vocab_size, (batch, prompt_len)).tolist()
    ours = {}
    out = generate(mcfg, params, prompts, new_tokens)
    ours["new_tokens_per_s"] = batch * new_tokens / _median_seconds(
        lambda: generate(mcfg, params, prompts, new_tokens), repeats)
    ours["prefill_s"] = _median_seconds(lambda: generate(mcfg, params, prompts, 1), repeats)
    result = {"params": mcfg.num_params(), "batch": batch, "prompt_len": prompt_len,
              "new_tokens": new_tokens, "ours": ours}
    if peer == "torch":
        theirs, same = _torch_decode(mcfg, params, prompts, new_tokens, repeats, out)
        result["torch"] = theirs
        result["same_tokens"] = same
        result["speed_ratio"] = ours["new_tokens_per_s"] / theirs["new_tokens_per_s"]
    return result


def _torch_decode(mcfg, params, prompts, new_tokens, repeats, ours_out):
    """transformers' greedy generate, timed alone in its own process (``python -m
    cpt_jax.eval.decode_speed``) on our weights exported to a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_llama(mcfg, jax.device_get(params), os.path.join(tmp, "m"), dtype="float32")
        job = os.path.join(tmp, "job.json")
        with open(job, "w") as f:
            json.dump({"model": os.path.join(tmp, "m"), "prompts": prompts,
                       "new_tokens": new_tokens, "repeats": repeats}, f)
        subprocess.run([sys.executable, "-m", "cpt_jax.eval.decode_speed", job], check=True)
        with open(job + ".out") as f:
            out = json.load(f)
    same = sum(a == b for a, b in zip(out.pop("tokens"), ours_out)) / len(prompts)
    return out, same


def _torch_worker(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    torch, transformers = peer_torch.require(shared=False)  # a process of its own
    torch.set_num_threads(peer_torch.cpu_threads())
    transformers.utils.logging.disable_progress_bar()
    model = transformers.LlamaForCausalLM.from_pretrained(job["model"],
                                                          dtype=torch.float32).eval()
    ids = torch.tensor(job["prompts"])
    n = job["new_tokens"]

    def run(k):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                                  min_new_tokens=k, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)

    out = {"tokens": run(n)[:, ids.shape[1]:].tolist(),
           "new_tokens_per_s": len(job["prompts"]) * n / _median_seconds(
               lambda: run(n), job["repeats"]),
           "prefill_s": _median_seconds(lambda: run(1), job["repeats"])}
    with open(job_path + ".out", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    _torch_worker(sys.argv[1])

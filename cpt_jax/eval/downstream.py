"""Zero-shot multiple-choice scoring by log-likelihood, natively in JAX.

A task is a JSON-lines file, one example a line::

    {"context": "The capital of France is", "choices": [" Paris", " Rome"], "label": 0}

Each choice is scored as the sum of the log-probabilities of its tokens given BOS + context
(the "loglikelihood" request of EleutherAI's lm-evaluation-harness, Gao et al. 2021-2024).
Tokenization follows the harness's ``_encode_pair``: trailing whitespace of the context is
moved to the front of the continuation, ``context + continuation`` is encoded as one string
and the continuation's tokens are what follows the context's own encoding; sequences longer
than the model's context keep their last ``seq_len + 1`` tokens. Per task we report

- ``acc``: argmax of the summed log-likelihood is the label;
- ``acc_norm``: argmax of log-likelihood / ``len(choice)``, the choice's length in
  *characters* (Python ``len`` of the choice string, as the harness's ``acc_norm`` does;
  Gao 2021, "Multiple Choice Normalization in LM Evaluation");
- ``acc_norm_token``: argmax of log-likelihood / number of choice tokens (tokenizer-dependent,
  so not comparable across tokenizers; shown because papers also use it);
- ``chance``: the expected accuracy of a uniform guess, mean of 1 / n_choices.

Ties go to the first choice (``np.argmax``), as in the harness.

Batching: every (example, choice) pair is one row of a fixed ``[batch, seq_len + 1]`` array,
right-padded with segment id 0, so a single compiled function serves every batch of every
task passed to ``evaluate_tasks``. Rows are sharded over the mesh's batch axes (data, fsdp)
and parameters by the config's logical-axis rules, exactly as in training. Causal attention
plus the segment mask mean padding never changes a real token's logits. Inputs are host
arrays placed by ``jax.jit``, so scoring runs in one process (gather a multi-host model's
parameters, or score on one host).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax import model as model_lib
from cpt_jax import sharding as sharding_lib


class TaskError(ValueError):
    """A task file or example that cannot be scored; the message names it and the fix."""


# ----------------------------------------------------------------------------- tasks


def check_example(ex, where: str) -> dict:
    """``ex`` validated: context str, choices >= 2 non-empty strs, label an index into them."""
    if not isinstance(ex, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(ex).__name__}")
    missing = [k for k in ("context", "choices", "label") if k not in ex]
    if missing:
        raise TaskError(f"{where}: missing field(s) {missing}; each line needs "
                        '{"context": str, "choices": [str, ...], "label": int}')
    ctx, choices, label = ex["context"], ex["choices"], ex["label"]
    if not isinstance(ctx, str):
        raise TaskError(f"{where}: context must be a string")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise TaskError(f"{where}: choices must be a list of at least 2 non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise TaskError(f"{where}: label={label!r} must be an int index into the "
                        f"{len(choices)} choices")
    return ex


def load_task(path: str) -> list[dict]:
    """The examples of a JSON-lines task file (blank lines skipped), validated."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{i}: not valid JSON ({e})") from None
            out.append(check_example(ex, f"{path}:{i}"))
    if not out:
        raise TaskError(f"{path}: no examples")
    return out


def task_name(path: str) -> str:
    """``dir/hellaswag.jsonl`` -> ``hellaswag``."""
    base = os.path.basename(path)
    for ext in (".jsonl", ".json"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


# ----------------------------------------------------------------------------- requests


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness's ``_encode_pair`` makes them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tokenizer.encode(context + continuation))
    ctx = list(tokenizer.encode(context)) if context else []
    return ctx, whole[len(ctx):]


def make_requests(tokenizer, examples: Sequence[dict], max_tokens: int | None = None,
                  where: str = "task") -> list[tuple[list[int], int]]:
    """One ``(tokens, n_continuation)`` per (example, choice), examples in order.

    ``tokens`` = [BOS] + context + continuation, cut on the left to ``max_tokens``; the last
    ``n_continuation`` tokens are the ones scored.
    """
    reqs = []
    for i, ex in enumerate(examples):
        for c in ex["choices"]:
            ctx, cont = encode_pair(tokenizer, ex["context"], c)
            if not cont:
                raise TaskError(f"{where} example {i}: choice {c!r} encodes to no token of its "
                                "own after the context")
            tokens = [tokenizer.bos_id] + ctx + cont
            if max_tokens is not None and len(tokens) > max_tokens:
                if len(cont) >= max_tokens:
                    raise TaskError(f"{where} example {i}: choice {c!r} has {len(cont)} tokens, "
                                    f"more than the model's context ({max_tokens - 1})")
                tokens = tokens[-max_tokens:]
            reqs.append((tokens, len(cont)))
    return reqs


def pack(requests: Sequence[tuple[list[int], int]], seq_len: int, batch_size: int):
    """Right-padded arrays for ``requests``, rows padded up to a multiple of ``batch_size``.

    Returns ``tokens``, ``segment_ids`` and ``cont_mask``, each int32 ``[N', seq_len + 1]``:
    segment 1 on real tokens, 0 on padding; ``cont_mask`` 1 on the scored tokens.
    """
    n = max(1, math.ceil(len(requests) / batch_size)) * batch_size
    tokens = np.zeros((n, seq_len + 1), np.int32)
    seg = np.zeros_like(tokens)
    cont = np.zeros_like(tokens)
    for r, (toks, n_cont) in enumerate(requests):
        if len(toks) > seq_len + 1:
            raise ValueError(f"request {r} has {len(toks)} tokens > seq_len + 1 = {seq_len + 1}")
        tokens[r, : len(toks)] = toks
        seg[r, : len(toks)] = 1
        cont[r, len(toks) - n_cont: len(toks)] = 1
    return tokens, seg, cont


def default_seq_len(requests, config: model_lib.LlamaConfig) -> int:
    """Smallest power of two >= the longest request's input length (min 16), capped at the
    model's max_seq_len; shared by every task scored together, so one compile serves all."""
    longest = max((len(t) - 1 for t, _ in requests), default=1)
    return int(min(config.max_seq_len, max(16, 1 << max(0, longest - 1).bit_length())))


# ----------------------------------------------------------------------------- scoring


def _loglik_rows(config, params, tokens, segment_ids, cont_mask):
    """Per row: sum of log p(token) over the scored tokens [B] (float32)."""
    logits = model_lib.forward(config, params, tokens[:, :-1], segment_ids[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok_lp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(tok_lp * cont_mask[:, 1:].astype(jnp.float32), axis=-1)


@functools.lru_cache(maxsize=8)
def _scorer(config: model_lib.LlamaConfig, mesh, rules):
    """(jitted row scorer, parameter shardings) for one model/mesh/rules; cached so repeated
    calls with the same shapes reuse the compiled function."""
    p_shard = sharding_lib.logical_to_sharding(model_lib.param_logical_axes(config), mesh, rules)
    rows = sharding_lib.batch_sharding(mesh, 2)
    jitted = jax.jit(functools.partial(_loglik_rows, config),
                     in_shardings=(p_shard, rows, rows, rows),
                     out_shardings=sharding_lib.replicated(mesh))

    def score(params, tokens, seg, cont):
        with sharding_lib.activate(mesh, rules):
            return jitted(params, tokens, seg, cont)

    return score, p_shard


def _mesh_and_rules(mesh, rules):
    if mesh is None:
        mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    return mesh, sharding_lib.rules_from_config(rules)


def score_requests(config: model_lib.LlamaConfig, params, requests, *, batch_size: int = 32,
                   seq_len: int | None = None, mesh=None, rules=None) -> np.ndarray:
    """Summed continuation log-likelihood of every request, float64 ``[len(requests)]``.

    ``batch_size`` is rounded up to a multiple of the mesh's batch shards; ``seq_len``
    defaults to ``default_seq_len``. ``mesh``/``rules`` default to all devices on the data
    axis and ``cpt_jax.sharding.DEFAULT_RULES``.
    """
    if not requests:
        return np.zeros((0,), np.float64)
    mesh, rules = _mesh_and_rules(mesh, rules)
    div = sharding_lib.batch_divisor(mesh)
    batch_size = max(div, math.ceil(batch_size / div) * div)
    seq_len = seq_len or default_seq_len(requests, config)
    tokens, seg, cont = pack(requests, seq_len, batch_size)
    score, p_shard = _scorer(config, mesh, rules)
    params = jax.device_put(params, p_shard)
    out = []
    for s in range(0, tokens.shape[0], batch_size):
        b = slice(s, s + batch_size)
        out.append(np.asarray(jax.device_get(score(params, tokens[b], seg[b], cont[b]))))
    return np.concatenate(out)[: len(requests)].astype(np.float64)


def choice_metrics(examples: Sequence[dict], lls: Sequence[float],
                   n_tokens: Sequence[int] | None = None) -> dict:
    """acc, acc_norm (per character), acc_norm_token (per token, if ``n_tokens`` given),
    chance and n from flat per-choice log-likelihoods in example order."""
    lls = np.asarray(lls, np.float64)
    acc = norm = tok = 0.0
    k = 0
    for ex in examples:
        m = len(ex["choices"])
        ll = lls[k: k + m]
        chars = np.array([len(c) for c in ex["choices"]], np.float64)
        acc += float(np.argmax(ll) == ex["label"])
        norm += float(np.argmax(ll / chars) == ex["label"])
        if n_tokens is not None:
            tok += float(np.argmax(ll / np.asarray(n_tokens[k: k + m], np.float64))
                         == ex["label"])
        k += m
    if k != len(lls):
        raise ValueError(f"{len(lls)} log-likelihoods for {k} choices")
    n = len(examples)
    out = {"acc": acc / n, "acc_norm": norm / n,
           "chance": float(np.mean([1.0 / len(ex["choices"]) for ex in examples])), "n": n}
    if n_tokens is not None:
        out["acc_norm_token"] = tok / n
    return out


def score_tasks(config: model_lib.LlamaConfig, params, tokenizer,
                tasks: Mapping[str, Sequence[dict]], *, batch_size: int = 32,
                seq_len: int | None = None, mesh=None, rules=None) -> dict:
    """``{task: [{"loglik": [per choice], "n_tokens": [per choice]}, ...]}``, one entry per
    example in order: the summed log-likelihood of each choice (what the harness's
    ``loglikelihood`` request returns, for cross-checks) and its token count. All tasks
    share one compiled scorer.

    ``tokenizer`` needs ``encode(str) -> list[int]`` and ``bos_id`` (e.g.
    ``cpt_jax.data.tokenizer.Tokenizer``).
    """
    if getattr(tokenizer, "vocab_size", config.vocab_size) > config.vocab_size:
        raise TaskError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                        f"{config.vocab_size}: pass the tokenizer the model was trained with")
    reqs, spans = [], {}
    for name, examples in tasks.items():
        for i, ex in enumerate(examples):
            check_example(ex, f"task {name} example {i}")
        r = make_requests(tokenizer, examples, (seq_len or config.max_seq_len) + 1,
                          where=f"task {name}")
        spans[name] = (len(reqs), len(reqs) + len(r))
        reqs += r
    lls = score_requests(config, params, reqs, batch_size=batch_size, seq_len=seq_len,
                         mesh=mesh, rules=rules)
    out = {}
    for name, examples in tasks.items():
        k, items = spans[name][0], []
        for ex in examples:
            m = len(ex["choices"])
            items.append({"loglik": [float(x) for x in lls[k: k + m]],
                          "n_tokens": [n for _, n in reqs[k: k + m]]})
            k += m
        out[name] = items
    return out


def task_metrics(examples: Sequence[dict], items: Sequence[dict]) -> dict:
    """``choice_metrics`` of one task from its ``score_tasks`` items."""
    return choice_metrics(examples, [x for it in items for x in it["loglik"]],
                          [n for it in items for n in it["n_tokens"]])


def evaluate_tasks(config: model_lib.LlamaConfig, params, tokenizer,
                   tasks: Mapping[str, Sequence[dict]], *, batch_size: int = 32,
                   seq_len: int | None = None, mesh=None, rules=None) -> dict:
    """``{task: choice_metrics}`` for every task (scored by ``score_tasks``)."""
    scored = score_tasks(config, params, tokenizer, tasks, batch_size=batch_size,
                         seq_len=seq_len, mesh=mesh, rules=rules)
    return {name: task_metrics(tasks[name], scored[name]) for name in tasks}

"""cpt_jax.generate against transformers' greedy generate, a plain loop of full forward
passes without a cache, and the softmax it samples from."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import model as model_lib
from cpt_jax.generate import generate, sample_logits
from cpt_jax.hf import load_hf_llama

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
TINY = model_lib.LlamaConfig(
    vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
    rope_theta=500000.0, max_seq_len=64, init_std=0.3,
    rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8))


@pytest.fixture(scope="module")
def tiny_params():
    return model_lib.init_params(TINY, jax.random.key(3))


@pytest.mark.parametrize("name", ["gqa", "tied", "llama3_scaling", "bf16"])
def test_greedy_equals_transformers_generate(name):
    """greedy.json: transformers' LlamaForCausalLM.generate(do_sample=False), one prompt at a
    time (scripts/make_hf_fixtures.py); here both prompts in one left-padded batch."""
    ref = json.loads((FIXTURES / name / "greedy.json").read_text())
    config, params = load_hf_llama(FIXTURES / name)
    out = generate(config, params, ref["prompts"], len(ref["continuations"][0]))
    assert out == ref["continuations"]


_FORWARD = jax.jit(model_lib.forward, static_argnums=0)


def _greedy_reference(config, params, prompt, n, stop, width=24):
    """A full forward pass over the whole sequence at every step (right-padded to one
    width, which a causal model's earlier logits do not see), argmax at its last token."""
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(seq)] = seq
        logits = np.asarray(_FORWARD(config, params, jnp.asarray(padded)))[0, len(seq) - 1]
        seq.append(int(np.argmax(logits)))
        if seq[-1] in stop:
            break
    return seq[len(prompt):]


def test_greedy_equals_full_forward_loop_with_uneven_prompts_and_eos(tiny_params):
    prompts = [[1, 5, 9, 13], [1, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [4]]
    free = [_greedy_reference(TINY, tiny_params, p, 10, ()) for p in prompts]
    assert generate(TINY, tiny_params, prompts, 10) == free
    # a stop id that one row produces mid-way: that row ends with it, the others go on
    stop = free[1][3]
    want = [_greedy_reference(TINY, tiny_params, p, 10, (stop,)) for p in prompts]
    assert any(len(w) < 10 for w in want) and any(len(w) == 10 for w in want)
    assert generate(TINY, tiny_params, prompts, 10, stop_ids=(stop,)) == want


def test_scan_and_per_layer_params_generate_alike(tiny_params):
    unrolled = dataclass_replace(TINY, scan_layers=False)
    per_layer = {k: v for k, v in tiny_params.items() if k != "layers"}
    for i in range(TINY.n_layers):
        per_layer[f"layers_{i}"] = jax.tree.map(lambda x: x[i], tiny_params["layers"])
    prompts = [[1, 5, 9], [2]]
    assert (generate(unrolled, per_layer, prompts, 6)
            == generate(TINY, tiny_params, prompts, 6))


def dataclass_replace(config, **kw):
    import dataclasses

    return dataclasses.replace(config, **kw)


def _binomial_ok(counts, probs, n, sigmas=5.0):
    expected = n * probs
    bound = sigmas * np.sqrt(n * probs * (1 - probs)) + 2
    return np.all(np.abs(counts - expected) <= bound), np.abs(counts - expected) - bound


def test_sampled_first_tokens_follow_the_tempered_softmax(tiny_params):
    prompt = [1, 5, 9, 13]
    n, temperature = 4000, 0.7
    logits = np.asarray(model_lib.forward(TINY, tiny_params, jnp.asarray([prompt])),
                        np.float64)[0, -1] / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    out = generate(TINY, tiny_params, [prompt] * n, 1, temperature=temperature, seed=7)
    counts = np.bincount([o[0] for o in out], minlength=TINY.vocab_size)
    ok, excess = _binomial_ok(counts, probs, n)
    assert ok, excess.max()
    assert out == generate(TINY, tiny_params, [prompt] * n, 1, temperature=temperature, seed=7)
    assert out != generate(TINY, tiny_params, [prompt] * n, 1, temperature=temperature, seed=8)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (4, 0.5)])
def test_top_k_and_top_p_sample_from_the_renormalised_head(top_k, top_p):
    logits = np.array([2.0, 1.5, 1.2, 0.9, 0.5, 0.1, -0.3, -1.0])
    temperature, n = 1.3, 6000
    p = np.exp(logits / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    head = order[:top_k] if top_k else order  # top-k first, then the nucleus of what is left
    q = p[head] / p[head].sum()
    keep = np.zeros_like(p, bool)
    mass = 0.0
    for i, qi in zip(head, q):  # by definition: the most likely first, until mass >= top_p
        if mass >= top_p:
            break
        keep[i] = True
        mass += qi
    want = np.where(keep, p, 0.0)
    want /= want.sum()
    draws = sample_logits(jnp.asarray(np.tile(logits, (n, 1)), jnp.float32),
                          jax.random.key(0), temperature, top_k, top_p)
    counts = np.bincount(np.asarray(draws), minlength=len(logits))
    assert np.all(counts[~keep] == 0)
    ok, excess = _binomial_ok(counts, want, n)
    assert ok, excess.max()


def test_bad_arguments_are_refused(tiny_params):
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(TINY, tiny_params, [[1], []], 3)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(TINY, tiny_params, [[1, 61]], 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(TINY, tiny_params, [[1]], 3, temperature=1.0, top_p=0.0)

"""Build the tiny Hugging Face Llama fixtures in tests/fixtures/hf/, and check our export.

The fixtures are what tests/test_hf.py compares cpt_jax against, so they come from the
reference implementation itself: random ``transformers.LlamaForCausalLM`` models saved with
``save_pretrained(safe_serialization=True)``, plus ``tokens.npy`` and the float32
``logits.npy`` that transformers computes on them. Run it once, with a Python that has torch
and transformers (kept out of cpt_jax's own environment), and commit the output::

    HF_PY scripts/make_hf_fixtures.py --jax-python JAX_PY

where HF_PY has ``torch transformers safetensors numpy`` and JAX_PY has cpt_jax's
dependencies. With ``--jax-python`` the script also proves ``cpt_jax.hf.save_hf_llama``
right: JAX_PY makes random cpt_jax parameters, computes logits with ``cpt_jax.model.forward``
and exports them; this script loads each export with ``LlamaForCausalLM.from_pretrained``
and prints the max logit difference. That check writes only to a temporary directory.

Every parameter is randomised, RMSNorm scales included (around 1), so that a swapped or
mis-transposed tensor changes the logits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "hf"

BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, tie_word_embeddings=False)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)

# name -> (config overrides, save options, sequence length)
CASES = {
    "gqa": ({}, {}, 16),
    "tied": ({"tie_word_embeddings": True}, {}, 16),
    "rope_theta": ({"rope_theta": 500000.0, "head_dim": 16}, {}, 16),
    # Longer than original_max_position_embeddings=16, so the scaled low frequencies matter.
    "llama3_scaling": ({"rope_theta": 500000.0, "rope_scaling": LLAMA3}, {}, 40),
    "sharded": ({}, {"max_shard_size": "40KB"}, 16),
    "bf16": ({"num_key_value_heads": 4}, {"dtype": "bfloat16"}, 16),
}
BATCH = 2


def _randomize(model, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[-1]))  # ~unit-variance activations


def make_fixtures(out: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for seed, (name, (over, save, seq)) in enumerate(CASES.items()):
        cfg = LlamaConfig(**{**BASE, **over}, attn_implementation="eager")
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
        _randomize(model, seed)
        if model.config.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        if save.get("dtype") == "bfloat16":
            model = model.to(torch.bfloat16)
        d = out / name
        kwargs = {"max_shard_size": save["max_shard_size"]} if "max_shard_size" in save else {}
        model.save_pretrained(d, safe_serialization=True, **kwargs)
        # Reference logits: the saved checkpoint reloaded and run in float32 (bf16 weights
        # upcast exactly). Reloading, rather than model.float(), keeps RoPE's inv_freq buffer
        # in float32: .to(bfloat16) would have rounded it too.
        ref = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32,
                                               attn_implementation="eager").eval()
        saved = dict(model.named_parameters())
        for pname, p in ref.named_parameters():  # the reload holds exactly the saved weights
            assert torch.equal(p, saved[pname].float()), pname
        tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (BATCH, seq)).astype(np.int32)
        with torch.no_grad():
            logits = ref(torch.from_numpy(tokens).long()).logits.numpy()
        np.save(d / "tokens.npy", tokens)
        np.save(d / "logits.npy", logits.astype(np.float32))
        write_greedy(ref, d, tokens)
        files = sorted(p.name for p in d.iterdir())
        print(f"fixture {name:15s} seq={seq:3d} |logits|max={np.abs(logits).max():.2f} files={files}")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"total fixture size: {size / 1024:.0f} KiB")
    assert size < 1_000_000, "fixtures must stay under 1 MB"


GREEDY_PROMPT_LENGTHS = (5, 9)
GREEDY_NEW_TOKENS = 12


def write_greedy(model, d: Path, tokens: np.ndarray):
    """``greedy.json``: transformers' greedy ``generate`` continuation of prompts cut from
    ``tokens`` (one prompt per call, no EOS), the reference for cpt_jax.generate."""
    import json

    import torch

    prompts = [tokens[i % len(tokens), :n].tolist() for i, n in enumerate(GREEDY_PROMPT_LENGTHS)]
    outs = []
    for prompt in prompts:
        with torch.no_grad():
            ids = torch.tensor([prompt])  # an explicit mask: token 0 is a token here, not padding
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=GREEDY_NEW_TOKENS,
                                 min_new_tokens=GREEDY_NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        outs.append(out[0, len(prompt):].tolist())
    (d / "greedy.json").write_text(json.dumps({"prompts": prompts, "continuations": outs}) + "\n")


def greedy_only(out: Path):
    """Add greedy.json to the committed fixtures, leaving their weights as they are."""
    import torch
    from transformers import LlamaForCausalLM

    for name in CASES:
        d = out / name
        model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
        write_greedy(model, d, np.load(d / "tokens.npy"))
        print(f"greedy {name}: {(d / 'greedy.json').read_text().strip()[:120]}")


# ----------------------------------------------------------------------------- export check

# (name, LlamaConfig kwargs, save_hf_llama kwargs, sequence length)
EXPORT_CASES = [
    ("gqa", dict(n_kv_heads=2), {}, 16),
    ("tied", dict(tie_embeddings=True), {}, 16),
    ("head_dim", dict(head_dim=16, rope_theta=500000.0), {}, 16),
    ("llama3_scaling", dict(rope_theta=500000.0, rope_scaling={
        k: v for k, v in LLAMA3.items() if k != "rope_type"}), {}, 40),
    ("sharded", dict(), {"max_shard_bytes": 40_000}, 16),
    ("bf16", dict(), {"dtype": "bfloat16"}, 16),
]


def jax_export(out: Path):
    """(Runs under --jax-python.) Random cpt_jax params -> save_hf_llama + reference logits."""
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp

    from cpt_jax.hf import save_hf_llama
    from cpt_jax.model import LlamaConfig, forward, init_params

    for seed, (name, over, save, seq) in enumerate(EXPORT_CASES):
        base = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64,
                    max_seq_len=64, norm_eps=1e-5)
        cfg = LlamaConfig(**{**base, **over})
        params = init_params(cfg, jax.random.key(seed))
        # Randomise every leaf (norm scales around 1) so a mix-up cannot hide.
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
        new = []
        for (path, x), k in zip(leaves, keys):
            noise = jax.random.normal(k, x.shape, x.dtype)
            is_norm = "scale" in jax.tree_util.keystr(path)
            new.append(1.0 + 0.2 * noise if is_norm else 0.15 * noise)  # 0.15 ~ 1/sqrt(d_model)
        params = jax.tree_util.tree_unflatten(treedef, new)
        if save.get("dtype") == "bfloat16":  # logits of the weights as they will be stored
            params = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
        tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (BATCH, seq)).astype(np.int32)
        logits = np.asarray(forward(cfg, params, tokens))
        d = out / name
        save_hf_llama(cfg, params, d / "model", **save)
        np.save(d / "tokens.npy", tokens)
        np.save(d / "logits.npy", logits)


def check_export(jax_python: str):
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tmp = Path(tempfile.mkdtemp(prefix="cpt_jax_export_check_"))
    try:
        subprocess.run([jax_python, __file__, "_jax_export", str(tmp)], check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
        worst = 0.0
        for name, *_ in EXPORT_CASES:
            d = tmp / name
            files = sorted(p.name for p in (d / "model").iterdir())
            model = LlamaForCausalLM.from_pretrained(d / "model", dtype=torch.float32,
                                                     attn_implementation="eager").eval()
            tokens = np.load(d / "tokens.npy")
            with torch.no_grad():
                logits = model(torch.from_numpy(tokens).long()).logits.numpy()
            err = float(np.abs(logits - np.load(d / "logits.npy")).max())
            worst = max(worst, err)
            print(f"export {name:15s} transformers-vs-cpt_jax max|dlogit|={err:.2e} files={files}")
        print(f"export check: worst max|dlogit| = {worst:.2e}")
        assert worst <= 1e-4, "save_hf_llama output does not reproduce cpt_jax logits"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help=f"fixture directory (default {OUT})")
    ap.add_argument("--jax-python", default=None,
                    help="a Python with cpt_jax's dependencies; when given, also check that "
                         "save_hf_llama output loads in transformers and reproduces logits")
    ap.add_argument("--skip-fixtures", action="store_true", help="only run the export check")
    ap.add_argument("--greedy-only", action="store_true",
                    help="only add greedy.json (transformers' greedy generate) to the fixtures")
    args = ap.parse_args()
    if args.greedy_only:
        greedy_only(args.out)
    elif not args.skip_fixtures:
        make_fixtures(args.out)
    if args.jax_python:
        check_export(args.jax_python)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_jax_export":
        jax_export(Path(sys.argv[2]))
    else:
        main()

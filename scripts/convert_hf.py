"""Convert Llama checkpoints between Hugging Face safetensors and cpt_jax params checkpoints.

  hf-to-orbax   HF LlamaForCausalLM directory (config.json + safetensors) -> params checkpoint
                (model_config.json + orbax params/), the format training runs start from.
                The checkpoint's tokenizer is kept in OUT/tokenizer/.
  orbax-to-hf   params checkpoint -> HF directory that transformers' from_pretrained loads,
                with the run's tokenizer (--tokenizer, or found from the run the checkpoint
                belongs to): a tokenizer.json carried unchanged, or one that encodes exactly
                as the run's SentencePiece model (cpt_jax.hf_tokenizer).

Examples:
  python scripts/convert_hf.py hf-to-orbax --hf ~/models/Llama-3.2-1B --out ckpt/llama1b
  python scripts/convert_hf.py orbax-to-hf --ckpt ckpt/llama1b --out export/llama1b --dtype bfloat16

Conversion is bit-exact (bf16 -> float32 is lossless; orbax-to-hf --dtype bfloat16 of a
model converted from a bf16 checkpoint gives back the original bytes); no torch is needed. Outputs
are written under a temporary name and renamed at the end; an existing non-empty output is
refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import os
import sys


from cpt_jax import results_file
from cpt_jax.data.tokenizer import (KINDS, TokenizerError, find_run_tokenizer, load_tokenizer,
                                    save_run_tokenizer)
from cpt_jax.hf import DEFAULT_MAX_SHARD_BYTES, load_hf_llama, save_hf_llama
from cpt_jax.hf_tokenizer import TokenizerExportError
from cpt_jax.train.checkpoint import check_tokenizer, load_params, save_params

DTYPES = ["float32", "bfloat16", "float16"]


def hf_to_orbax(hf: str, out: str, param_dtype: str | None = "float32", overwrite: bool = False):
    """``hf`` -> params checkpoint ``out``, with the checkpoint's tokenizer (if it has one)
    in ``out/tokenizer/``, where runs starting from ``init.orbax=out`` and exports find it."""
    has_tokenizer = any(os.path.isfile(os.path.join(hf, f)) for _, f in KINDS.values())
    tokenizer = load_tokenizer(hf) if has_tokenizer else None  # refused before any write
    config, params = load_hf_llama(hf, param_dtype=param_dtype)
    save_params(out, config, params, overwrite=overwrite,
                tokenizer_sha256=tokenizer.sha256 if tokenizer is not None else None)
    if tokenizer is not None:
        save_run_tokenizer(tokenizer, out, config.max_seq_len)
    return config


def orbax_to_hf(ckpt: str, out: str, dtype: str | None = None, overwrite: bool = False,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer: str | None = None):
    """Export ``ckpt`` to ``out``; ``tokenizer`` (a .model, a tokenizer.json or a folder)
    defaults to the run's. Warns on stderr when no tokenizer is written."""
    tokenizer = tokenizer or find_run_tokenizer(ckpt)
    if tokenizer is not None:
        tokenizer = load_tokenizer(tokenizer)
        check_tokenizer(ckpt, tokenizer)
    config, params = load_params(ckpt)
    save_hf_llama(config, params, out, dtype=dtype, max_shard_bytes=max_shard_bytes,
                  overwrite=overwrite, tokenizer=tokenizer)
    if tokenizer is None:
        print(f"warning: {out} has no tokenizer: none was given and none could be found from "
              f"{ckpt}/../{results_file.FILE}, so AutoTokenizer.from_pretrained({out!r}) will fail; "
              "rerun with --tokenizer PATH (the tokenizer the model was trained with)",
              file=sys.stderr)
    return config


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="convert_hf.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{hf-to-orbax,orbax-to-hf}")

    a = sub.add_parser("hf-to-orbax", help="HF safetensors directory -> cpt_jax params checkpoint",
                       description="Read a HF LlamaForCausalLM directory and write a cpt_jax "
                                   "params checkpoint (model_config.json + orbax params/).")
    a.add_argument("--hf", required=True, help="HF model directory: config.json plus "
                   "model.safetensors or sharded model-*.safetensors with index json")
    a.add_argument("--out", required=True, help="output checkpoint directory (must not exist "
                   "or be empty, unless --overwrite)")
    a.add_argument("--param_dtype", "--param-dtype", default="float32", choices=DTYPES + ["keep"],
                   help="dtype of the stored params (default float32, the usual master-weight "
                        "dtype for training; 'keep' = the HF checkpoint's own dtype)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    b = sub.add_parser("orbax-to-hf", help="cpt_jax params checkpoint -> HF safetensors directory",
                       description="Read a cpt_jax params checkpoint and write a HF "
                                   "LlamaForCausalLM directory loadable by from_pretrained.")
    b.add_argument("--ckpt", required=True, help="params checkpoint directory (from save_params "
                   "or hf-to-orbax)")
    b.add_argument("--out", required=True, help="output HF model directory")
    b.add_argument("--dtype", default=None, choices=DTYPES,
                   help="dtype of the written tensors (default: the checkpoint's dtype)")
    b.add_argument("--max_shard_gb", "--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e9,
                   help="split safetensors into shards of at most this many GB (default 5)")
    b.add_argument("--tokenizer", help="tokenizer to export beside the weights: a "
                   "SentencePiece .model, a tokenizer.json or a folder holding either "
                   "(default: the tokenizer of the run the checkpoint belongs to)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    args = ap.parse_args(argv)
    try:
        if args.command == "hf-to-orbax":
            dtype = None if args.param_dtype == "keep" else args.param_dtype
            config = hf_to_orbax(args.hf, args.out, dtype, args.overwrite)
        else:
            config = orbax_to_hf(args.ckpt, args.out, args.dtype, args.overwrite,
                                 int(args.max_shard_gb * 1e9), args.tokenizer)
    except (OSError, ValueError, KeyError, TokenizerError, TokenizerExportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"convert_hf.py: error: {msg}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {config.n_layers} layers, d_model {config.d_model}, "
          f"{config.num_params() / 1e6:.1f}M params")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Continue prompts with a model: the quick check that a continued checkpoint still writes.

    python scripts/generate.py --hf ~/models/Llama-3.2-1B --prompt "The capital of France is"
    python scripts/generate.py --ckpt runs/x/final_params --prompt "def f(x):" \
        --prompt "Once upon a time" --max_new_tokens 64 --temperature 0.8 --top_p 0.95 --seed 1

--hf: a Hugging Face Llama directory (weights, config.json and its tokenizer).
--ckpt: a params checkpoint (a run's WORKDIR/final_params, an hf-to-orbax output) or a run
workdir holding final_params; the tokenizer is the run's own copy (WORKDIR/tokenizer/),
or --tokenizer.

Each prompt is encoded as [BOS] prompt and continued until EOS (every stop id the
checkpoint declares) or --max_new_tokens (cpt_jax.generate: a KV cache, jit-compiled).
--temperature 0 (the default) decodes greedily; otherwise tokens are sampled, restricted by
--top_k and --top_p, from a key given by --seed. Prints each continuation (the prompt
excluded), or with --json one JSON object per prompt with the token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cpt_jax import cli
from cpt_jax.data.tokenizer import TokenizerError, find_run_tokenizer, load_tokenizer
from cpt_jax.generate import generate
from cpt_jax.hf import load_hf_llama
from cpt_jax.train.checkpoint import CONFIG_FILE, check_tokenizer, load_params


def load_model(args):
    """(LlamaConfig, params, tokenizer) from --hf or --ckpt (and --tokenizer)."""
    if args.hf:
        config, params = load_hf_llama(args.hf)
        tok_path = args.tokenizer or args.hf
    else:
        ckpt = args.ckpt
        if not os.path.isfile(os.path.join(ckpt, CONFIG_FILE)) and os.path.isfile(
                os.path.join(ckpt, "final_params", CONFIG_FILE)):
            ckpt = os.path.join(ckpt, "final_params")
        if not os.path.isfile(os.path.join(ckpt, CONFIG_FILE)):
            raise FileNotFoundError(
                f"--ckpt {args.ckpt} is not a params checkpoint (no {CONFIG_FILE}); give a "
                "run's final_params (save_final_params=True) or an hf-to-orbax output")
        tok_path = args.tokenizer or find_run_tokenizer(ckpt)
        if tok_path is None:
            raise TokenizerError(f"--ckpt {args.ckpt}: no tokenizer was kept beside it; pass "
                                 "--tokenizer PATH (the tokenizer the model was trained with)")
        config, params = load_params(ckpt)
    tokenizer = load_tokenizer(tok_path)
    if args.ckpt:
        check_tokenizer(ckpt, tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(f"the tokenizer {tok_path} has {tokenizer.vocab_size} tokens but "
                             f"the model only {config.vocab_size} embedding rows; pass the "
                             "tokenizer the model was trained with")
    return config, params, tokenizer


def main(argv) -> int:
    ap = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Hugging Face Llama directory")
    src.add_argument("--ckpt", help="params checkpoint, or a run workdir with final_params")
    ap.add_argument("--tokenizer", help="tokenizer (.model, tokenizer.json or a folder); "
                    "default: the checkpoint's own")
    ap.add_argument("--prompt", action="append", required=True,
                    help="text to continue (repeat for a batch)")
    ap.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top_k", "--top-k", type=int, default=0, help="0: no top-k cut")
    ap.add_argument("--top_p", "--top-p", type=float, default=1.0, help="1.0: no nucleus cut")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="one JSON object per prompt")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    args = ap.parse_args(argv)

    config, params, tok = load_model(args)
    prompts = [[tok.bos_id] + tok.encode(p) for p in args.prompt]
    outs = generate(config, params, prompts, args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, stop_ids=tok.stop_ids)
    for text, ids in zip(args.prompt, outs):
        if args.json:
            print(json.dumps({"prompt": text, "continuation": tok.decode(ids), "ids": ids},
                             ensure_ascii=False))
        else:
            print(tok.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))

"""Score a params checkpoint on multiple-choice tasks, and export it for lm-evaluation-harness.

    python scripts/evaluate.py --ckpt runs/x/final_params --tasks tasks/*.jsonl \
        [--tokenizer PATH] [--out scores.json] [--hf-export hf/x [--dtype bfloat16]]

--tasks: JSON-lines files of {"context": str, "choices": [str, ...], "label": int}; each is
scored zero-shot by log-likelihood (cpt_jax.eval.downstream): acc, acc_norm (per character,
as lm-evaluation-harness), acc_norm_token and chance are printed and, with --out, written.

--tokenizer: the run's SentencePiece .model. Left out, it is found from the run the
checkpoint belongs to (CKPT/../results.json: config.tokenizer.path, or the tokenizer the run
trained under its data cache).

--hf-export OUTDIR: writes a Hugging Face LlamaForCausalLM directory (cpt_jax.hf.save_hf_llama)
with the tokenizer beside it (tokenizer.model, tokenizer_config.json for the sentencepiece
LlamaTokenizer, special_tokens_map.json) and prints the lm-evaluation-harness command that
evaluates it on standard benchmarks. That command needs, in its environment:
pip install lm_eval transformers torch sentencepiece protobuf. The model was trained on
[BOS] document [EOS] rows, so the command asks for add_bos_token=True, and for the slow
(sentencepiece) tokenizer, which encodes exactly as training did.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpt_jax import atomic  # noqa: E402
from cpt_jax.data.tokenizer import TokenizerError, load_tokenizer, trained_prefix  # noqa: E402
from cpt_jax.eval import downstream  # noqa: E402
from cpt_jax.hf import save_hf_llama  # noqa: E402
from cpt_jax.train.checkpoint import CONFIG_FILE, load_params  # noqa: E402

LM_EVAL_TASKS = "hellaswag,piqa,arc_easy,arc_challenge"


def find_run_tokenizer(ckpt: str) -> str | None:
    """The tokenizer of the run whose workdir holds ``ckpt`` (None if it cannot be told)."""
    workdir = os.path.dirname(os.path.abspath(ckpt))
    res_path = os.path.join(workdir, "results.json")
    if not os.path.isfile(res_path):
        return None
    with open(res_path) as f:
        config = json.load(f).get("config") or {}
    tok = config.get("tokenizer") or {}
    if tok.get("path"):
        return os.path.expanduser(tok["path"])
    data_dir = os.path.expanduser((config.get("data") or {}).get("cache_dir") or
                                  os.path.join(workdir, "data"))
    path = trained_prefix(data_dir, tok.get("model_type", "bpe"),
                          config["model"]["vocab_size"]) + ".model"
    return path if os.path.isfile(path) else None


def export_tokenizer(tok, out_dir: str, model_max_length: int) -> None:
    """tokenizer.model + the config files transformers' LlamaTokenizer reads.

    ``legacy: true`` makes LlamaTokenizer hand text straight to sentencepiece, so it encodes
    exactly as cpt_jax's Tokenizer does; ``add_bos_token: true`` matches training rows.
    """
    piece = tok.sp.id_to_piece
    special = {"bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
               "unk_token": piece(tok.unk_id)}
    if tok.pad_id >= 0:
        special["pad_token"] = piece(tok.pad_id)
    config = {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True,
              "add_eos_token": False, "legacy": True, "clean_up_tokenization_spaces": False,
              "model_max_length": int(model_max_length), "sp_model_kwargs": {}}
    atomic.write_bytes(os.path.join(out_dir, "tokenizer.model"), open(tok.path, "rb").read())
    atomic.write_bytes(os.path.join(out_dir, "tokenizer_config.json"),
                  (json.dumps(config, indent=2) + "\n").encode())
    atomic.write_bytes(os.path.join(out_dir, "special_tokens_map.json"),
                  (json.dumps(special, indent=2) + "\n").encode())


def lm_eval_command(hf_dir: str, dtype: str, with_tokenizer: bool) -> str:
    args = f"pretrained={hf_dir},dtype={dtype},add_bos_token=True"
    if with_tokenizer:
        args += ",use_fast_tokenizer=False"
    return (f"lm_eval --model hf --model_args {args} --tasks {LM_EVAL_TASKS} "
            "--batch_size 16")


def _table(scores: dict) -> str:
    lines = [f"{'task':<24} {'n':>6} {'acc':>7} {'acc_norm':>9} {'norm_tok':>9} {'chance':>7}"]
    for name, m in scores.items():
        lines.append(f"{name:<24} {m['n']:>6} {m['acc']:>7.4f} {m['acc_norm']:>9.4f} "
                     f"{m['acc_norm_token']:>9.4f} {m['chance']:>7.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True,
                    help="params checkpoint directory (checkpoint.save_params, e.g. "
                         "WORKDIR/final_params)")
    ap.add_argument("--tasks", nargs="*", default=[], help="JSON-lines task files")
    ap.add_argument("--tokenizer", help="SentencePiece .model (default: the run's)")
    ap.add_argument("--out", help="write the scores as JSON here")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per scoring batch")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="scoring window (default: the longest request, rounded up to a "
                         "power of two, at most the model's max_seq_len)")
    ap.add_argument("--hf-export", metavar="OUTDIR", help="also write a Hugging Face checkpoint")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the exported weights")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUTDIR")
    args = ap.parse_args(argv)

    def fail(msg):
        print(f"evaluate.py: error: {msg}", file=sys.stderr)
        return 2

    if not args.tasks and not args.hf_export:
        return fail("nothing to do: give --tasks and/or --hf-export")
    if not os.path.isfile(os.path.join(args.ckpt, CONFIG_FILE)):
        return fail(f"{args.ckpt} is not a params checkpoint (no {CONFIG_FILE}); give a "
                    "directory written by checkpoint.save_params, e.g. WORKDIR/final_params "
                    "of a run with save_final_params=True")
    try:
        tasks = {downstream.task_name(p): downstream.load_task(p)
                 for t in args.tasks for p in (sorted(glob.glob(t)) or [t])}
    except (OSError, downstream.TaskError) as e:
        return fail(str(e))
    tok_path = args.tokenizer or find_run_tokenizer(args.ckpt)
    tok = None
    if tok_path:
        try:
            tok = load_tokenizer(tok_path)
        except TokenizerError as e:
            return fail(str(e))
    elif tasks:
        return fail("no tokenizer: pass --tokenizer PATH (the run's SentencePiece .model); "
                    f"it could not be found from {args.ckpt}/../results.json")

    config, params = load_params(args.ckpt)
    if tasks:
        scores = downstream.evaluate_tasks(config, params, tok, tasks,
                                           batch_size=args.batch_size, seq_len=args.seq_len)
        print(_table(scores))
        if args.out:
            atomic.write_bytes(args.out, (json.dumps(
                {"ckpt": os.path.abspath(args.ckpt), "tokenizer": tok.path,
                 "tasks": scores}, indent=1) + "\n").encode())
            print(f"wrote {args.out}")
    if args.hf_export:
        try:
            save_hf_llama(config, params, args.hf_export, dtype=args.dtype,
                          overwrite=args.overwrite)
        except FileExistsError as e:
            return fail(f"{e} (use --overwrite)")
        if tok is not None:
            export_tokenizer(tok, args.hf_export, config.max_seq_len)
        else:
            print("note: no tokenizer given or found; the export has none (pass --tokenizer "
                  "to add tokenizer.model)", file=sys.stderr)
        print(f"wrote Hugging Face checkpoint {args.hf_export}")
        print("evaluate it with lm-evaluation-harness "
              "(pip install lm_eval transformers torch sentencepiece protobuf):")
        print("  " + lm_eval_command(os.path.abspath(args.hf_export), args.dtype,
                                     tok is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Score a params checkpoint on multiple-choice tasks, and export it for lm-evaluation-harness.

    python scripts/evaluate.py --ckpt runs/x/final_params --tasks tasks/*.jsonl \
        [--tokenizer PATH] [--out scores.json] [--hf_export hf/x [--dtype bfloat16]] \
        [--lm_eval_config lm_eval_tasks/]

--tasks: JSON-lines files of {"context": str, "choices": [str, ...], "label": int}; each is
scored zero-shot by log-likelihood (cpt_jax.eval.downstream): acc, acc_norm (per character,
as lm-evaluation-harness), acc_norm_token and chance are printed and, with --out, written
together with every item's per-choice log-likelihoods and token counts.

--tokenizer: the run's tokenizer (a SentencePiece .model, a tokenizer.json or a folder
holding either). Left out, it is the copy the run keeps in WORKDIR/tokenizer/ (for a
checkpoint from hf-to-orbax, CKPT/tokenizer/).

--hf_export OUTDIR: writes a Hugging Face LlamaForCausalLM directory (cpt_jax.hf.save_hf_llama)
with the tokenizer beside it (the run's tokenizer.json unchanged, or one converted from its
SentencePiece model that encodes exactly as it, see cpt_jax.hf_tokenizer; and the config
files) and prints the lm-evaluation-harness command that evaluates it on standard
benchmarks. That command needs, in its environment: pip install 'lm_eval[hf]' torch.
The model was trained on [BOS] document [EOS] rows, so the command asks for add_bos_token=True.

--lm_eval_config DIR: writes each --tasks file as a local lm-evaluation-harness task
(DIR/NAME.yaml + DIR/NAME.jsonl, cpt_jax.eval.lm_eval_task) with the native scorer's prompt,
and prints the command that scores it on the export with per-item samples, to compare with
--out.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys


from cpt_jax import atomic, results_file
from cpt_jax.data.tokenizer import TokenizerError, find_run_tokenizer, load_tokenizer
from cpt_jax.eval import downstream, lm_eval_task
from cpt_jax.hf import save_hf_llama
from cpt_jax.hf_tokenizer import TokenizerExportError
from cpt_jax.train.checkpoint import CONFIG_FILE, check_tokenizer, load_params

LM_EVAL_TASKS = "hellaswag,piqa,arc_easy,arc_challenge"


def lm_eval_command(hf_dir: str, dtype: str) -> str:
    return (f"lm_eval --model hf --model_args pretrained={hf_dir},dtype={dtype},"
            f"add_bos_token=True --tasks {LM_EVAL_TASKS} --batch_size 16")


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
    ap.add_argument("--tokenizer", help="tokenizer: .model, tokenizer.json or a folder "
                    "(default: the run's)")
    ap.add_argument("--out", help="write the scores as JSON here")
    ap.add_argument("--batch_size", "--batch-size", type=int, default=32, help="rows per scoring batch")
    ap.add_argument("--seq_len", "--seq-len", type=int, default=None,
                    help="scoring window (default: the longest request, rounded up to a "
                         "power of two, at most the model's max_seq_len)")
    ap.add_argument("--hf_export", "--hf-export", metavar="OUTDIR", help="also write a Hugging Face checkpoint")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the exported weights")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUTDIR")
    ap.add_argument("--lm_eval_config", "--lm-eval-config", metavar="DIR",
                    help="write the --tasks files as local lm-evaluation-harness tasks here")
    args = ap.parse_args(argv)

    def fail(msg):
        print(f"evaluate.py: error: {msg}", file=sys.stderr)
        return 2

    if not args.tasks and not args.hf_export:
        return fail("nothing to do: give --tasks and/or --hf_export")
    if args.lm_eval_config and not args.tasks:
        return fail("--lm_eval_config writes the --tasks files as lm-eval tasks: give --tasks")
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
            check_tokenizer(args.ckpt, tok)
        except (TokenizerError, ValueError) as e:
            return fail(str(e))
    elif tasks:
        return fail("no tokenizer: pass --tokenizer PATH (the run's tokenizer); "
                    f"it could not be found from {args.ckpt}/../{results_file.FILE}")

    config, params = load_params(args.ckpt)
    if tasks:
        try:
            scored = downstream.score_tasks(config, params, tok, tasks,
                                            batch_size=args.batch_size, seq_len=args.seq_len)
        except downstream.TaskError as e:
            return fail(str(e))
        scores = {name: downstream.task_metrics(tasks[name], scored[name]) for name in tasks}
        print(_table(scores))
        if args.out:
            atomic.write_json(args.out, {"ckpt": os.path.abspath(args.ckpt),
                                         "tokenizer": tok.path, "tasks": scores,
                                         "items": scored})
            print(f"wrote {args.out}")
    if args.hf_export:
        try:
            save_hf_llama(config, params, args.hf_export, dtype=args.dtype,
                          overwrite=args.overwrite, tokenizer=tok)
        except FileExistsError as e:
            return fail(f"{e} (use --overwrite)")
        except (TokenizerError, TokenizerExportError) as e:
            return fail(str(e))
        if tok is None:
            print(f"warning: {args.hf_export} has no tokenizer: none was given and none could "
                  f"be found from {args.ckpt}/../{results_file.FILE}, so AutoTokenizer will fail on "
                  "it; pass --tokenizer PATH (the run's tokenizer)", file=sys.stderr)
        print(f"wrote Hugging Face checkpoint {args.hf_export}")
        print("evaluate it with lm-evaluation-harness (pip install 'lm_eval[hf]' torch):")
        print("  " + lm_eval_command(os.path.abspath(args.hf_export), args.dtype))
    if args.lm_eval_config:
        names = [lm_eval_task.write_lm_eval_task(p, args.lm_eval_config)
                 for t in args.tasks for p in (sorted(glob.glob(t)) or [t])]
        hf_dir = os.path.abspath(args.hf_export) if args.hf_export else "HF_EXPORT_DIR"
        print(f"wrote lm-evaluation-harness task(s) {', '.join(names)} to {args.lm_eval_config}; "
              "score them on the export (per-item log-likelihoods under lm_eval_out/) with:")
        print("  " + lm_eval_task.lm_eval_command(hf_dir, os.path.abspath(args.lm_eval_config),
                                                   names, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())

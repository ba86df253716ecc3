"""Prepare a run's data ahead of training: train (or load) its tokenizer, then tokenize and
pack every domain into array_record rows (see cpt_jax/data/prepare.py).

    python scripts/prepare_data.py --config configs/demo.py --workdir runs/demo
    python scripts/prepare_data.py --config configs/my_run.py \
        --config.data.cache_dir=/data/packed [--config.KEY=VALUE ...]

It reads the same config a run does (data.domains, tokenizer, model.vocab_size, seq_len,
data.val_fraction and data.split_seed) and calls the same functions, so the run finds the
prepared data in its cache (data.cache_dir, or WORKDIR/data) and skips the work: prepare
on a CPU host, then train on the accelerators. Prints one JSON line per domain with its
folder and sizes. Input errors are one line with exit status 2 (--debug for the
traceback).
"""

from __future__ import annotations

import json
import os
import sys
import time

from cpt_jax import cli
from cpt_jax.data import prepare
from cpt_jax.data.recipe import Recipe
from cpt_jax.train.setup import load_tokenizer


def parse_args(argv):
    overrides, rest = cli.split_overrides(argv)
    p = cli.config_parser("prepare_data.py", __doc__)
    p.add_argument("--workdir", default=None,
                   help="the run's workdir; its data cache is WORKDIR/data unless "
                        "data.cache_dir is set")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return p.parse_args(rest), overrides


def main(argv) -> dict:
    args, overrides = parse_args(argv)
    config = cli.load_config(args.config, overrides)
    if not config.data.domains:
        raise cli.UserError(f"--config {args.config} lists no data.domains to prepare")
    if not (config.data.cache_dir or args.workdir):
        raise cli.UserError("say where the data goes: --workdir (the run's cache is "
                            "WORKDIR/data) or --config.data.cache_dir=DIR")
    data_dir = os.path.expanduser(config.data.cache_dir
                                  or os.path.join(args.workdir, "data"))
    os.makedirs(data_dir, exist_ok=True)
    domains = [dict(d) for d in config.data.domains]
    start = time.time()
    tok = load_tokenizer(config, domains, data_dir)
    print(json.dumps({"tokenizer": tok.path, "vocab_size": tok.vocab_size,
                      "seconds": round(time.time() - start, 2)}))
    heldout = Recipe.of_config(config).heldout if config.tasks else ()  # as the run does
    prepared = prepare.prepare_domains(domains, tok, data_dir, config.seq_len,
                                       config.data.val_fraction, config.data.split_seed,
                                       progress=not args.no_progress, val_only=heldout)
    summary = {}
    for name, splits in prepared.items():
        meta = splits["train"].meta
        summary[name] = {"dir": os.path.dirname(splits["train"].path),
                         "chars": sum(s["chars"] for s in meta["splits"].values()),
                         "documents": meta["n_documents"], "tokens": meta["n_tokens"],
                         "train_rows": len(splits["train"]), "val_rows": len(splits["val"])}
        print(json.dumps({"domain": name, **summary[name]}))
    print(json.dumps({"seconds_total": round(time.time() - start, 2)}))
    return summary


if __name__ == "__main__":
    sys.exit(cli.run_main(lambda argv: main(argv) and 0))

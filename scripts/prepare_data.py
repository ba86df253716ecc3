"""Prepare a run's data ahead of training: train (or load) its tokenizer, then tokenize and
pack every domain into array_record rows (see cpt_jax/data/prepare.py).

    python scripts/prepare_data.py --config configs/demo.py --workdir runs/demo
    python scripts/prepare_data.py --config configs/my_run.py \
        --config.data.cache_dir=/data/packed [--config.data.workers=N] [--config.KEY=VALUE ...]

It reads the same config a run does (data.domains, tokenizer, model.vocab_size, seq_len,
data.val_fraction, data.split_seed and data.workers, the tokenizer processes: 0 = the
machine's cores) and calls the same functions, so the run finds the prepared data in its
cache (data.cache_dir, or WORKDIR/data) and skips the work: prepare on a CPU host, then
train on the accelerators. Prints one JSON line per domain with its folder and sizes.

Several hosts (a scheduler's array job): train the tokenizer once (a plain run of this
script with --tokenizer_only), then run ``--shard i/n`` on node i of n (each reads every
domain, and tokenizes and writes its share of the units into the shared cache), then one
``--finalize`` assembles the folders: the same files as one process. Input errors are one
line with exit status 2 (--debug for the traceback); SIGTERM or Ctrl-C stops with one line
and exit status 130 or 143, keeping complete domains and shards and nothing half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time

from cpt_jax import cli
from cpt_jax.data import prepare, stop_signals
from cpt_jax.data.recipe import Recipe
from cpt_jax.train.setup import load_tokenizer


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise cli.UserError(f"--shard {text!r}: give i/n, e.g. --shard 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise cli.UserError(f"--shard {text}: i/n needs 0 <= i < n, e.g. --shard 0/{max(n, 1)}")
    return i, n


@contextlib.contextmanager
def _heartbeat(label: str, enabled: bool, every_s: float = 5.0):
    """Says what is running and, every ``every_s`` seconds until it ends, for how long."""
    if not enabled:
        yield
        return
    done = threading.Event()
    start = time.time()
    print(f"{label} ...", file=sys.stderr, flush=True)

    def beat():
        while not done.wait(every_s):
            print(f"{label}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    print(f"{label}: done in {time.time() - start:.1f} s", file=sys.stderr, flush=True)


def parse_args(argv):
    overrides, rest = cli.split_overrides(argv)
    p = cli.config_parser("prepare_data.py", __doc__)
    p.add_argument("--workdir", default=None,
                   help="the run's workdir; its data cache is WORKDIR/data unless "
                        "data.cache_dir is set")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="prepare only shard I of N of every domain (units u with u %% N == "
                        "I) into the shared cache; then run --finalize once")
    p.add_argument("--finalize", action="store_true",
                   help="assemble the shards written by --shard runs into the prepared "
                        "folders")
    p.add_argument("--tokenizer_only", action="store_true",
                   help="train (or load) the tokenizer and stop")
    return p.parse_args(rest), overrides


def main(argv) -> dict:
    args, overrides = parse_args(argv)
    config = cli.load_config(args.config, overrides)
    if not config.data.domains:
        raise cli.UserError(f"--config {args.config} lists no data.domains to prepare")
    if not (config.data.cache_dir or args.workdir):
        raise cli.UserError("say where the data goes: --workdir (the run's cache is "
                            "WORKDIR/data) or --config.data.cache_dir=DIR")
    if args.shard and args.finalize:
        raise cli.UserError("--shard and --finalize are separate steps: run --shard i/n on "
                            "every node first, then --finalize once")
    shard = _shard(args.shard) if args.shard else None
    data_dir = os.path.expanduser(config.data.cache_dir
                                  or os.path.join(args.workdir, "data"))
    os.makedirs(data_dir, exist_ok=True)
    prepare.sources.use_hash_cache(data_dir)
    domains = [dict(d) for d in config.data.domains]
    start = time.time()
    with stop_signals.stop_on_signals(), _heartbeat(
            f"tokenizer: loading, or training on a sample of {len(domains)} domains",
            not args.no_progress):
        tok = load_tokenizer(config, domains, data_dir)
    print(json.dumps({"tokenizer": tok.path, "vocab_size": tok.vocab_size,
                      "seconds": round(time.time() - start, 2)}), flush=True)
    if args.tokenizer_only:
        return {}
    heldout = Recipe.of_config(config).heldout if config.tasks else ()  # as the run does
    kwargs = dict(seq_len=config.seq_len, val_fraction=config.data.val_fraction,
                  seed=config.data.split_seed, progress=not args.no_progress,
                  val_only=heldout, workers=config.data.get("workers", 0))
    if shard is not None:
        prepare.prepare_domains(domains, tok, data_dir, shard=shard, finalize=False,
                                **kwargs)
        print(json.dumps({"shard": f"{shard[0]}/{shard[1]}", "domains": len(domains),
                          "seconds_total": round(time.time() - start, 2)}))
        return {}
    if args.finalize:
        prepare.finalize_domains(domains, tok, data_dir, **kwargs)
    prepared = prepare.prepare_domains(domains, tok, data_dir, **kwargs)
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


def _run(argv) -> int:
    try:
        return 0 if main(argv) is not None else 0
    except prepare.PreparationStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + (signal.SIGINT if "SIGINT" in str(e) else signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(cli.run_main(_run))

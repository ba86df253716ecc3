"""Tokenize and pack domains into array_record rows (see cpt_jax/data/prepare.py).

Examples::

    # the three offline demo domains, with a freshly trained 2048-piece tokenizer
    python scripts/prepare_data.py --demo --data_dir /tmp/cpt_data --vocab_size 2048 \\
        --seq_len 128

    # your own domains (JSON dicts, see cpt_jax/data/sources.py) and an existing tokenizer
    python scripts/prepare_data.py --data_dir /data/packed --seq_len 2048 \\
        --tokenizer /ckpt/llama2/tokenizer.model \\
        --domain '{"name": "en", "kind": "jsonl", "pattern": "/data/en/*.jsonl.gz"}' \\
        --domain '{"name": "fr", "kind": "tfds", "tfds_name": "wiki40b/fr"}'

The training loop calls the same functions (train_tokenizer / load_tokenizer and
prepare_domains), so data prepared here is found and reused by a run with the same
settings. Prints one JSON line per domain with its folder and sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpt_jax import cli  # noqa: E402  pylint: disable=wrong-import-position
from cpt_jax.data import prepare, sources, tokenizer  # noqa: E402  pylint: disable=wrong-import-position
from cpt_jax.run_config import default_config  # noqa: E402  pylint: disable=wrong-import-position

DEFAULTS = default_config()  # the same defaults as a run, so a run finds this data


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--domain", action="append", default=[],
                   help="a domain as a JSON dict; repeat for several (in task order)")
    p.add_argument("--demo", action="store_true",
                   help=f"add the offline demo domains {sources.DEMOS}")
    p.add_argument("--demo_max_chars", type=int, default=sources.DEFAULT_DEMO_MAX_CHARS,
                   help="size cap of each demo domain, in characters")
    p.add_argument("--data_dir", required=True, help="where prepared domains are stored")
    p.add_argument("--seq_len", type=int, required=True, help="tokens per row, minus one")
    p.add_argument("--val_fraction", type=float, default=DEFAULTS.data.val_fraction,
                   help="share of documents held out for validation")
    p.add_argument("--seed", type=int, default=DEFAULTS.data.split_seed,
                   help="seed of the train/val split")
    p.add_argument("--tokenizer", help="an existing SentencePiece .model to use")
    p.add_argument("--vocab_size", type=int,
                   help="train a tokenizer of this size (when --tokenizer is not given)")
    p.add_argument("--tokenizer_prefix",
                   help="where to write the trained tokenizer (default: "
                        "<data_dir>/tokenizer-<model_type>-<vocab_size>, where a run looks)")
    p.add_argument("--model_type", default=DEFAULTS.tokenizer.model_type,
                   choices=("bpe", "unigram"))
    p.add_argument("--sample_chars", type=int, default=DEFAULTS.tokenizer.sample_chars,
                   help="characters of text (over all domains) to train the tokenizer on")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    domains = []
    for text in args.domain:
        try:
            domains.append(json.loads(text))
        except json.JSONDecodeError as e:
            raise cli.UserError(f"--domain {text!r} is not a JSON dict ({e}); quote it, e.g. "
                                f"--domain '{{\"name\": \"en\", \"kind\": \"text_glob\", "
                                f"\"pattern\": \"/data/*.txt\"}}'") from None
    if args.demo:
        domains += [{"kind": "demo", "demo": name, "max_chars": args.demo_max_chars}
                    for name in sources.DEMOS]
    if not domains:
        raise cli.UserError("No domains: give --domain JSON (repeatable) and/or --demo.")
    domains = [sources.validate_domain(d) for d in domains]

    start = time.time()
    if args.tokenizer:
        tok = tokenizer.load_tokenizer(args.tokenizer)
    elif args.vocab_size:
        prefix = args.tokenizer_prefix or tokenizer.trained_prefix(
            args.data_dir, args.model_type, args.vocab_size)
        tok = tokenizer.train_tokenizer(
            domains, prefix, args.vocab_size, model_type=args.model_type,
            character_coverage=DEFAULTS.tokenizer.character_coverage,
            sample_chars=args.sample_chars)
    else:
        raise cli.UserError("Give --tokenizer PATH (an existing .model) or --vocab_size N "
                            "(train one).")
    tok_seconds = time.time() - start
    print(json.dumps({"tokenizer": tok.path, "vocab_size": tok.vocab_size,
                      "seconds": round(tok_seconds, 2)}))

    prepared = prepare.prepare_domains(domains, tok, args.data_dir, args.seq_len,
                                       args.val_fraction, args.seed,
                                       progress=not args.no_progress)
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

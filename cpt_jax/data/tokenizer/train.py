"""Train a SentencePiece tokenizer on a run's domains (the ``sentencepiece`` kind).

``train_tokenizer`` trains a byte-fallback BPE (or unigram) model on a deterministic sample
of all the run's domains, so every string is encodable (unseen characters become UTF-8
byte pieces) and the same inputs always give the same model bytes. The id layout follows
Llama-2 (unk=0, bos=1, eos=2) with pad=3. The normalizer is the identity and spaces are
kept as they are, so ``decode(encode(text)) == text`` and code indentation survives; the
sample is fed in multi-line chunks so newlines (and e.g. "):\\n") can become pieces.

Only a run that starts from random weights trains a tokenizer: a pre-trained model keeps
the one it was trained with (``cpt_jax.train.setup.load_tokenizer``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import sentencepiece as spm

from cpt_jax import atomic
from cpt_jax.data import sources
from cpt_jax.data.tokenizer.base import TokenizerError
from cpt_jax.data.tokenizer.sentencepiece_model import SentencePieceTokenizer

# The sample is fed to the trainer as chunks of at most this many characters,
# cut at line boundaries (spm ignores "sentences" longer than max_sentence_length bytes).
_CHUNK_CHARS = 2000
_MAX_SENTENCE_BYTES = 4 * _CHUNK_CHARS + 16


def _chunks(doc: str) -> Iterator[str]:
    """Multi-line chunks of at most _CHUNK_CHARS chars (long lines are cut)."""
    buf, size = [], 0
    for line in doc.split("\n"):
        while len(line) > _CHUNK_CHARS:
            if buf:
                yield "\n".join(buf)
                buf, size = [], 0
            yield line[:_CHUNK_CHARS]
            line = line[_CHUNK_CHARS:]
        if size + len(line) + 1 > _CHUNK_CHARS and buf:
            yield "\n".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line) + 1
    if buf:
        text = "\n".join(buf)
        if text.strip():
            yield text


def sample_text(domains: Sequence[Any], sample_chars: int) -> list[str]:
    """The tokenizer training sample: ``sample_chars // len(domains)`` chars per domain.

    Each domain contributes its first documents (in source order) until its share is full,
    so a large domain cannot crowd out a small one. Deterministic given the domains.
    """
    if not domains:
        raise TokenizerError("train_tokenizer needs at least one domain.")
    share = max(1, int(sample_chars) // len(domains))
    out = []
    for domain in domains:
        d = sources.normalize_domain(domain)
        taken = 0
        for doc in sources.iter_documents(d):
            for chunk in _chunks(doc):
                out.append(chunk)
                taken += len(chunk)
                if taken >= share:
                    break
            if taken >= share:
                break
        if taken == 0:
            raise TokenizerError(f"Domain {d['name']!r} has no text to train the tokenizer "
                                 f"on; check its source.")
    return out


def _training_error(e: RuntimeError, names: list, vocab_size: int, sample) -> TokenizerError:
    """One explanation of a failed SentencePiece training, in the run's terms."""
    text = str(e)
    most = re.search(r"value <= (\d+)", text)
    if most:
        n_chars = len(set("".join(sample)))
        binary = sum(not c.isprintable() and c not in "\n\t" for c in set("".join(sample)))
        hint = (f"; {binary} distinct control characters suggest binary input, check the "
                "sources" if binary > 32 else "")
        return TokenizerError(
            f"the domains {names} hold too little distinct text for vocab_size={vocab_size}: "
            f"SentencePiece can make at most {most.group(1)} pieces from them (their "
            f"{n_chars} distinct characters, byte fallback and the merges the text allows). "
            f"Lower model.vocab_size to at most {most.group(1)}, or add text{hint}")
    return TokenizerError(f"SentencePiece training on domains {names} failed: "
                          f"{' '.join(text.split())}")


def trained_prefix(data_dir: str, model_type: str, vocab_size: int) -> str:
    """Where a run (and scripts/prepare_data.py) keeps the tokenizer it trains itself."""
    return os.path.join(data_dir, f"tokenizer-{model_type}-{int(vocab_size)}")


def train_tokenizer(domains: Sequence[Any], out_prefix: str, vocab_size: int,
                    model_type: str = "bpe", character_coverage: float = 0.9995,
                    sample_chars: int = 10_000_000, num_threads: int = 4) -> SentencePieceTokenizer:
    """Trains (or reuses) ``<out_prefix>.model`` on a sample of ``domains``; returns it.

    The model is written atomically (temp file, then rename) next to
    ``<out_prefix>.json``, which records what it was trained on; a later call with the same
    inputs loads the existing model instead of training again. The sample may include
    documents that prepare() later assigns to the validation split (a negligible leak that
    every tokenizer trained on a corpus has).

    ``num_threads`` is part of the inputs: SentencePiece partitions the sample per thread,
    so the model bytes depend on it. It is therefore a fixed default, not the machine's
    core count, which keeps the tokenizer identical across machines.
    """
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}.")
    if int(vocab_size) < 300:
        raise TokenizerError(f"vocab_size={vocab_size} is too small: byte fallback alone "
                             f"takes 256 + 4 special pieces; use at least 300.")
    specs = [sources.normalize_domain(d) for d in domains]
    args = dict(vocab_size=int(vocab_size), model_type=model_type,
                character_coverage=float(character_coverage),
                byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
                input_sentence_size=0, shuffle_input_sentence=False,
                max_sentence_length=_MAX_SENTENCE_BYTES, num_threads=int(num_threads),
                minloglevel=2)
    record = {"domains": specs,
              "sources": [sources.source_fingerprint(d) for d in specs],
              "sample_chars": int(sample_chars), "trainer": args,
              "sentencepiece": spm.__version__}
    key = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    model_path, info_path = out_prefix + ".model", out_prefix + ".json"
    if os.path.isfile(model_path) and os.path.isfile(info_path):
        with open(info_path) as f:
            if json.load(f).get("key") == key:
                return SentencePieceTokenizer.from_file(model_path)

    sample = sample_text(specs, sample_chars)
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sample), model_writer=proto,
                                       **args)
    except RuntimeError as e:
        raise _training_error(e, [d["name"] for d in specs], int(vocab_size), sample) from None
    atomic.write_bytes(model_path, proto.getvalue())
    tok = SentencePieceTokenizer(proto.getvalue(), path=model_path)
    info = {"key": key, "sha256": tok.sha256, "vocab_size": tok.vocab_size, **record}
    atomic.write_json(info_path, info, sort_keys=True, default=str)
    return tok

"""Tokenizers: one interface (``base.Tokenizer``), one class per kind, and ``load_tokenizer``
to turn a path into one.

Kinds (``KINDS``; a new kind is one class in its own file plus one entry here):

- ``sentencepiece``: a SentencePiece ``.model`` (Llama-2, TinyLlama, or trained by a run,
  ``train.train_tokenizer``);
- ``hf_json``: a Hugging Face ``tokenizer.json`` (Llama-3.x, SmolLM2, any fast tokenizer).

``load_tokenizer(path)`` takes either file, or a directory holding one (a Hugging Face
checkpoint). In a directory ``tokenizer.json`` wins over ``tokenizer.model``, as in
``transformers.AutoTokenizer``, so the ids are the ones AutoTokenizer gives.

A run keeps a copy of its tokenizer in ``WORKDIR/tokenizer/`` (``save_run_tokenizer``), so
evaluation, generation and the Hugging Face export of any of its checkpoints use exactly
the tokenizer it trained with (``find_run_tokenizer``).
"""

from __future__ import annotations

import os

from cpt_jax import atomic, results_file
from cpt_jax.data.tokenizer.base import (CheckpointSpecials, Tokenizer, TokenizerError,
                                         check_vocab)
from cpt_jax.data.tokenizer.hf_json import HFJsonTokenizer
from cpt_jax.data.tokenizer.sentencepiece_model import SentencePieceTokenizer
from cpt_jax.data.tokenizer.train import sample_text, train_tokenizer, trained_prefix

# kind -> (class, the file it is in a checkpoint directory); in directory-lookup order.
KINDS = {
    HFJsonTokenizer.kind: (HFJsonTokenizer, "tokenizer.json"),
    SentencePieceTokenizer.kind: (SentencePieceTokenizer, "tokenizer.model"),
}
RUN_TOKENIZER_DIR = "tokenizer"

__all__ = ["CheckpointSpecials", "HFJsonTokenizer", "KINDS", "SentencePieceTokenizer",
           "Tokenizer", "TokenizerError", "check_vocab", "find_run_tokenizer",
           "load_tokenizer", "resolve_path", "sample_text", "save_run_tokenizer",
           "train_tokenizer", "trained_prefix"]


def resolve_path(path: str) -> tuple[str, type]:
    """(the tokenizer file, its kind's class) for a file or a checkpoint directory."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        for cls, fname in KINDS.values():
            if os.path.isfile(os.path.join(path, fname)):
                return os.path.join(path, fname), cls
        files = " or ".join(f for _, f in KINDS.values())
        raise TokenizerError(f"tokenizer directory {path!r} holds no {files}; point "
                             "tokenizer.path at the checkpoint directory that has one, or at "
                             "the file itself")
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer {path!r} does not exist; give a SentencePiece .model, "
                             "a Hugging Face tokenizer.json, or a checkpoint directory holding "
                             "either")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    is_json = path.endswith(".json") or head.startswith(b"{")
    return path, (HFJsonTokenizer if is_json else SentencePieceTokenizer)


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a ``.model``, a ``tokenizer.json`` or a directory holding either,
    with the special tokens its checkpoint declares (TokenizerError names what is wrong)."""
    file, cls = resolve_path(path)
    return cls.from_file(file)


def save_run_tokenizer(tokenizer: Tokenizer, workdir: str, model_max_length: int) -> str:
    """Writes the run's tokenizer to ``WORKDIR/tokenizer/`` (replacing an older copy only
    once the new one is complete); returns the folder."""
    folder = os.path.join(workdir, RUN_TOKENIZER_DIR)
    if os.path.isdir(folder):
        try:
            if load_tokenizer(folder).sha256 == tokenizer.sha256:
                return folder
        except TokenizerError:
            pass
    tmp = atomic.temp_dir(workdir, RUN_TOKENIZER_DIR)
    tokenizer.save_own(tmp, model_max_length=model_max_length)
    atomic.replace_dir(tmp, folder)
    return folder


def find_run_tokenizer(path: str) -> str | None:
    """The tokenizer of the run (or conversion) that ``path`` belongs to: a params
    checkpoint (``WORKDIR/final_params``, or an ``hf-to-orbax`` output holding
    ``tokenizer/``), a run workdir or one of its ``checkpoints/STEP`` directories. Runs
    that kept no copy are looked up in ``WORKDIR/results.json`` (``tokenizer.path``, else
    the tokenizer the run trained in its data cache). None when there is none."""
    here = os.path.abspath(os.path.expanduser(str(path)))
    for _ in range(4):  # the path itself, then up to WORKDIR from WORKDIR/checkpoints/STEP/x
        folder = os.path.join(here, RUN_TOKENIZER_DIR)
        if os.path.isdir(folder):
            return folder
        here = os.path.dirname(here)
    workdir = os.path.dirname(os.path.abspath(os.path.expanduser(str(path))))
    config = {}
    if os.path.isfile(results_file.path(workdir)):
        try:
            config = results_file.read_config(workdir)
        except results_file.ResultsError as e:
            raise TokenizerError(str(e)) from None
    tok = config.get("tokenizer") or {}
    if tok.get("path"):
        return os.path.expanduser(tok["path"])
    if not config.get("model"):
        return None
    data_dir = os.path.expanduser((config.get("data") or {}).get("cache_dir") or
                                  os.path.join(workdir, "data"))
    trained = trained_prefix(data_dir, tok.get("model_type", "bpe"),
                             config["model"]["vocab_size"]) + ".model"
    return trained if os.path.isfile(trained) else None

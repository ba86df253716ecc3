"""What every tokenizer kind provides, and how a path becomes a tokenizer.

A kind is one class (a subclass of ``Tokenizer`` in its own file) plus one entry in
``KINDS`` (``cpt_jax.data.tokenizer``). The pipeline only uses this interface: ``encode``
and ``encode_batch`` (no special tokens added), ``decode``, the BOS/EOS/pad ids that
training rows are packed with (``[BOS] doc [EOS]``), ``stop_ids`` (every id that ends a
generated continuation), ``vocab_size`` (ids the tokenizer can produce, at most the
model's embedding rows), ``sha256`` (a content hash, part of every prepared-data key) and
``save`` (the tokenizer's own files, which ``load_tokenizer`` reads back with the same
hash and which ``AutoTokenizer.from_pretrained`` loads).

Special tokens follow the checkpoint: a Hugging Face directory's ``tokenizer_config.json``
(``bos_token``, ``eos_token``, ``pad_token``) and, where it names none, ``config.json`` and
``generation_config.json`` (``bos_token_id``, ``eos_token_id``, ``pad_token_id``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence


class TokenizerError(ValueError):
    """A tokenizer cannot be trained/loaded or does not fit the model; says how to fix it."""


class Tokenizer:
    """The interface of a tokenizer kind (see the module docstring).

    Attributes set by every kind: ``path`` (where it was loaded from, or None), ``sha256``,
    ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id`` (-1 when there is none, as in
    Llama-2 and Llama-3), ``stop_ids`` (tuple; EOS first).
    """

    kind = ""
    path: str | None
    sha256: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: tuple

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None
                     ) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special tokens (BOS, EOS, pad) decode to nothing."""
        raise NotImplementedError

    def save(self, out_dir: str, *, model_max_length: int) -> list[str]:
        """Writes the files ``AutoTokenizer.from_pretrained(out_dir)`` loads (and
        ``load_tokenizer(out_dir)`` reads back with the same ``sha256``); returns them."""
        raise NotImplementedError

    def save_own(self, out_dir: str, *, model_max_length: int) -> list[str]:
        """The files that ``load_tokenizer(out_dir)`` reads back as this same kind (a run's
        copy of its tokenizer); by default those of ``save``."""
        return self.save(out_dir, model_max_length=model_max_length)

    def special_ids(self) -> dict:
        """``{"bos_token_id", "eos_token_id", "pad_token_id"}`` for config.json and
        generation_config.json (None where the tokenizer has no such token)."""
        return {"bos_token_id": self.bos_id if self.bos_id >= 0 else None,
                "eos_token_id": self.eos_id,
                "pad_token_id": self.pad_id if self.pad_id >= 0 else None}

    def __repr__(self):
        return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})")


# ----------------------------------------------------------------------------- checkpoint files


def read_json(path: str) -> dict:
    """A JSON object file, or {} when it is absent; a broken one is named."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); restore it from the "
                             "checkpoint's original files") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path} holds {type(obj).__name__}, not a JSON object")
    return obj


def token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class CheckpointSpecials:
    """The special tokens a Hugging Face directory declares, by text and by id.

    ``text(kind)`` is the token string of "bos"/"eos"/"pad" from tokenizer_config.json or
    special_tokens_map.json; ``ids(kind)`` the ids from config.json and
    generation_config.json (``eos_token_id`` may be a list, as in Llama-3.1 instruct).
    """

    def __init__(self, folder: str | None):
        self.folder = folder
        j = (lambda name: read_json(os.path.join(folder, name))) if folder else (lambda _: {})
        self.tokenizer_config = j("tokenizer_config.json")
        self.special_map = j("special_tokens_map.json")
        self.model_config = j("config.json")
        self.generation_config = j("generation_config.json")

    def text(self, kind: str) -> str | None:
        key = f"{kind}_token"
        return token_text(self.tokenizer_config.get(key)) or token_text(self.special_map.get(key))

    def ids(self, kind: str) -> list[int]:
        out = []
        for cfg in (self.model_config, self.generation_config):
            v = cfg.get(f"{kind}_token_id")
            for i in (v if isinstance(v, list) else [v]):
                if isinstance(i, int) and not isinstance(i, bool) and i >= 0 and i not in out:
                    out.append(i)
        return out


def check_vocab(tokenizer: Tokenizer, embedding_rows: int) -> None:
    """Raises TokenizerError when the tokenizer can produce ids the model has no embedding
    for. More embedding rows than the tokenizer needs is fine (padded vocabularies, e.g.
    a vocabulary rounded up to a multiple of 64)."""
    if tokenizer.vocab_size > int(embedding_rows):
        raise TokenizerError(
            f"the tokenizer {tokenizer.path or ''} has {tokenizer.vocab_size} tokens but the "
            f"model has only {embedding_rows} embedding rows (model.vocab_size); use the "
            f"tokenizer the model was trained with, or set model.vocab_size >= "
            f"{tokenizer.vocab_size} for a fresh model")

"""SentencePiece tokenizers: a ``.model`` file (Llama-2, TinyLlama, or one trained by a run).

BOS/EOS/pad are the model's own control pieces (Llama-2: unk 0, bos 1, eos 2, no pad). A
checkpoint directory whose config.json names other BOS/EOS ids is refused: the rows would
be packed with ids the model was not trained with.

Meta's original Llama-3 ``tokenizer.model`` is a tiktoken BPE file (base64 token and rank
per line), not a SentencePiece model: it is recognised and refused with a pointer to the
``tokenizer.json`` of the Hugging Face release, which the ``hf_json`` kind reads.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence

import sentencepiece as spm

from cpt_jax import atomic, hf_tokenizer
from cpt_jax.data.tokenizer.base import CheckpointSpecials, Tokenizer, TokenizerError

FILE = "tokenizer.model"


def looks_like_tiktoken(data: bytes) -> bool:
    """True for a tiktoken BPE file: lines of ``<base64 token> <rank>``."""
    lines = data[:4096].splitlines()[:8]
    if not lines:
        return False
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            return False
        try:
            base64.b64decode(parts[0], validate=True)
        except (binascii.Error, ValueError):
            return False
    return True


class SentencePieceTokenizer(Tokenizer):
    """A SentencePieceProcessor with the ids the pipeline needs; ``sp`` is the processor."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, path: str | None = None):
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise _not_sentencepiece(path, model_proto, e) from None
        self.proto = model_proto
        self.path = path
        self.sha256 = hashlib.sha256(model_proto).hexdigest()
        self.vocab_size = int(self.sp.vocab_size())
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())
        self.pad_id = int(self.sp.pad_id())
        self.unk_id = int(self.sp.unk_id())
        self.stop_ids = (self.eos_id,)
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(
                f"tokenizer {path!r} has no {'BOS' if self.bos_id < 0 else 'EOS'} piece "
                f"(bos={self.bos_id}, eos={self.eos_id}); documents are packed as [BOS] doc "
                "[EOS], so use a model with both")

    @classmethod
    def from_file(cls, path: str) -> "SentencePieceTokenizer":
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            raise TokenizerError(f"tokenizer file {path!r} is empty; copy it again from the "
                                 "checkpoint, or point tokenizer.path at another file")
        tok = cls(data, path=path)
        tok._check_checkpoint_ids(CheckpointSpecials(os.path.dirname(path)))
        return tok

    def _check_checkpoint_ids(self, specials: CheckpointSpecials) -> None:
        for kind, mine in (("bos", self.bos_id), ("eos", self.eos_id)):
            declared = specials.ids(kind)
            if declared and mine not in declared:
                raise TokenizerError(
                    f"{specials.folder}/config.json gives {kind}_token_id={declared} but the "
                    f"SentencePiece model {self.path} has {kind} id {mine}; the model and its "
                    "tokenizer disagree: use the tokenizer the checkpoint was trained with")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None
                     ) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save(self, out_dir: str, *, model_max_length: int) -> list[str]:
        """``tokenizer.model`` plus a ``tokenizer.json`` that encodes exactly as it
        (``cpt_jax.hf_tokenizer``), so AutoTokenizer gives the training ids."""
        return hf_tokenizer.save_hf_tokenizer(self.proto, out_dir,
                                              model_max_length=model_max_length)


    def save_own(self, out_dir: str, *, model_max_length: int) -> list[str]:
        """``tokenizer.model`` alone, so the folder loads as this SentencePiece model."""
        return atomic.write_files(out_dir, {FILE: self.proto})


def _not_sentencepiece(path, data: bytes, e: Exception) -> TokenizerError:
    if looks_like_tiktoken(data):
        return TokenizerError(
            f"{path!r} is Meta's original tiktoken tokenizer (Llama-3 format), which is not "
            "read here; use the tokenizer.json of the Hugging Face release of the same model "
            "(e.g. meta-llama/Llama-3.2-1B/tokenizer.json), or its whole directory")
    return TokenizerError(f"{path!r} is not a SentencePiece model ({' '.join(str(e).split())});"
                          " give a SentencePiece .model, a Hugging Face tokenizer.json, or a "
                          "checkpoint directory holding either")

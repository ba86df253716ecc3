"""Hugging Face ``tokenizer.json`` tokenizers (Llama-3.x, SmolLM2, and Llama-2's fast
tokenizer), read with the ``tokenizers`` library that ``transformers`` itself uses.

Ids equal ``AutoTokenizer.from_pretrained(DIR)(text, add_special_tokens=False)``: the same
tokenizer.json, and the one setting of ``tokenizer_config.json`` that changes encoding,
``split_special_tokens`` (False by default: literal special-token text such as
"<|end_of_text|>" in a document is that special token, as in transformers).

Special tokens come from the checkpoint (``base.CheckpointSpecials``): the token strings of
tokenizer_config.json / special_tokens_map.json, else the ids of config.json /
generation_config.json, else the usual names among the special tokens
(``<|begin_of_text|>`` / ``<s>``, ``<|end_of_text|>`` / ``</s>`` / ``<|endoftext|>``).
Every EOS id that config.json or generation_config.json lists also stops generation.

``save`` carries tokenizer.json unchanged, with the checkpoint's tokenizer_config.json and
special_tokens_map.json (written when absent, or completed with bos_token / eos_token when
those came from config.json), so AutoTokenizer on an export encodes as on the original.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

from cpt_jax import atomic
from cpt_jax.data.tokenizer.base import CheckpointSpecials, Tokenizer, TokenizerError

FILE = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_USUAL = {"bos": ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>"),
          "eos": ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>"),
          "pad": ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")}


class HFJsonTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json, with the checkpoint's specials."""

    kind = "hf_json"

    def __init__(self, data: bytes, path: str | None = None, folder: str | None = None):
        import tokenizers

        self.path = path
        self.data = data
        try:
            self.tk = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - bad UTF-8, or the library's plain Exception
            raise TokenizerError(
                f"{path!r} is not a Hugging Face tokenizer.json ({' '.join(str(e).split())[:200]});"
                " copy it again from the checkpoint") from None
        specials = CheckpointSpecials(folder)
        self.raw = {name: _read_bytes(folder, name) for name in CONFIG_FILES}
        self.tokenizer_config = specials.tokenizer_config
        self.special_map = specials.special_map
        self.split_special_tokens = bool(self.tokenizer_config.get("split_special_tokens",
                                                                   False))
        self.tk.encode_special_tokens = self.split_special_tokens
        vocab = self.tk.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.bos_id = self._special(specials, "bos")
        self.eos_id = self._special(specials, "eos")
        self.pad_id = self._special(specials, "pad")
        where = f"tokenizer {path!r}" + (f" (and {folder}'s config files)" if folder else "")
        if self.eos_id < 0:
            raise TokenizerError(
                f"{where} names no EOS token; documents are packed as [BOS] doc [EOS]: add "
                "eos_token to tokenizer_config.json, or eos_token_id to config.json")
        if self.bos_id < 0:
            raise TokenizerError(
                f"{where} names no BOS token; documents are packed as [BOS] doc [EOS]: add "
                "bos_token to tokenizer_config.json, or bos_token_id to config.json")
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *(
            i for i in specials.ids("eos") if i < self.vocab_size)]))
        settings = {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id,
                    "split_special_tokens": self.split_special_tokens}
        self.sha256 = hashlib.sha256(
            data + json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def _special(self, specials: CheckpointSpecials, kind: str) -> int:
        text = specials.text(kind)
        if text is not None:
            i = self.tk.token_to_id(text)
            if i is None:
                raise TokenizerError(
                    f"tokenizer_config.json in {specials.folder} names {kind}_token={text!r}, "
                    f"which {self.path} does not contain; the files are from different "
                    "tokenizers: copy them again from one checkpoint")
            return int(i)
        ids = [i for i in specials.ids(kind) if i < self.vocab_size]
        if ids:
            return ids[0]
        added = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items()
                 if t.special}
        for name in _USUAL[kind]:
            if name in added:
                return int(added[name])
        return -1

    @classmethod
    def from_file(cls, path: str) -> "HFJsonTokenizer":
        with open(path, "rb") as f:
            data = f.read()
        if not data.strip():
            raise TokenizerError(f"tokenizer file {path!r} is empty; copy it again from the "
                                 "checkpoint, or point tokenizer.path at another file")
        return cls(data, path=path, folder=os.path.dirname(os.path.abspath(path)))

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None
                     ) -> list[list[int]]:
        encode = getattr(self.tk, "encode_batch_fast", self.tk.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, out_dir: str, *, model_max_length: int) -> list[str]:
        name = lambda i: self.tk.id_to_token(i) if i >= 0 else None
        specials = {f"{k}_token": name(i) for k, i in
                    (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id))
                    if i >= 0}
        config = dict(self.tokenizer_config) or {
            "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "model_max_length": int(model_max_length)}
        for key, text in specials.items():  # complete what config.json had supplied
            config.setdefault(key, text)
        if self.split_special_tokens:
            config["split_special_tokens"] = True
        special_map = dict(self.special_map) or specials
        files = {FILE: self.data}
        for fname, obj, original in (("tokenizer_config.json", config, self.tokenizer_config),
                                     ("special_tokens_map.json", special_map,
                                      self.special_map)):
            unchanged = self.raw.get(fname) is not None and obj == original
            files[fname] = self.raw[fname] if unchanged else (
                json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()
        return atomic.write_files(out_dir, files)


def _read_bytes(folder: str | None, name: str) -> bytes | None:
    path = os.path.join(folder, name) if folder else None
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read()
    return None

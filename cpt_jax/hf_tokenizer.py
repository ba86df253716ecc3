"""A SentencePiece model as a Hugging Face tokenizer that encodes and decodes exactly as the
model itself does.

``save_hf_tokenizer`` writes ``tokenizer.json`` (the ``tokenizers`` library's format, which
``transformers`` loads as its fast tokenizer), the original ``tokenizer.model``,
``tokenizer_config.json`` and ``special_tokens_map.json``. Shipping only ``tokenizer.model``
is not enough: transformers 5 always builds a fast tokenizer and, for ``LlamaTokenizer``,
its own Metaspace pre-tokenizer, which does not add SentencePiece's dummy-prefix "▁" in
front of text that already starts with a space (" x": SentencePiece ``['▁▁', 'x']``,
Metaspace ``['▁x']``), so code indentation and contexts starting with a space are tokenized differently
from training. Here every part of ``tokenizer.json`` is derived from the model proto
(``sentencepiece_model.proto``), not assumed:

- **normalizer**, SentencePiece's ``Normalizer::Normalize``: the precompiled character map
  (if the model has one, e.g. ``nmt_nfkc``); with ``remove_extra_whitespaces`` leading
  spaces dropped and runs of spaces collapsed; the dummy prefix (``add_dummy_prefix``,
  only for non-empty text, also when the text starts with a space); spaces escaped to
  "▁" (``escape_whitespaces``); then trailing "▁" dropped (``remove_extra_whitespaces``).
- **no pre-tokenizer**: SentencePiece segments the whole normalized string, with no split on
  whitespace (training options such as ``split_digits`` or ``split_by_whitespace`` only
  shape the vocabulary).
- **model**, BPE: SentencePiece merges, at each step, the adjacent pair whose concatenation
  is the highest-scoring piece (leftmost on ties). The HF BPE model merges by rank, so
  every split ``P = L + R`` of a normal piece into two normal pieces becomes a merge,
  ranked by the score of ``P``. Unigram: the pieces with their scores (Viterbi in both).
  Control, unknown and byte pieces keep their ids but are never produced from text, as in
  SentencePiece: BPE has no merge into them; unigram gives them a prohibitive score.
  ``byte_fallback`` as in the model: characters outside the vocabulary become ``<0xXX>``.
- **decoder**: the unknown piece -> the model's ``unk_surface`` (" ⁇ "), "▁" -> " ", runs of
  byte pieces -> their UTF-8 text (U+FFFD for invalid bytes), and the first space dropped
  when the model adds a dummy prefix.
- **post-processor**: ``[BOS] text`` (training rows are ``[BOS] document [EOS]``; scoring
  and generation condition on ``[BOS] prefix``), so ``tokenizer(text)["input_ids"] ==
  [bos_id] + sp.encode(text)``; ``add_special_tokens=False`` gives ``sp.encode(text)``.

Control pieces (``<s>``, ``</s>``, ``<pad>``) are special added tokens, the Hugging Face
convention: ``decode(ids, skip_special_tokens=True)`` equals
SentencePiece's decode (which renders control pieces as nothing), and without skipping
they appear as their text (lm-evaluation-harness relies on ``decode([bos_id])`` being
``"<s>"``). SentencePiece reads "<s>" in text as three characters; so does transformers
here (``tokenizer_config.json`` sets ``split_special_tokens``), while the ``tokenizers``
library, which does not store that setting, needs ``tok.encode_special_tokens = True``.

``tests/test_hf_tokenizer.py`` checks encode and decode against SentencePiece on a few
hundred strings, for models trained with different normalizer options. BPE models (the
default) encode identically. Unigram models can differ where two
segmentations score the same: SentencePiece sums scores in float32, so it breaks exact
ties (and, on texts of tens of thousands of characters, differences below float32
resolution) by rounding, where ``tokenizers`` (float64) keeps the first best path; both
segmentations then have the same score. And a unigram vocabulary cannot hide a piece from
matching: text spelling a control or byte piece ("</s>", "<0x41>") is encoded as that piece
when one of its characters is outside the vocabulary (an unknown character always costs
more than any piece), where SentencePiece falls back to bytes.

Not supported (refused with ``TokenizerExportError``): ``treat_whitespace_as_suffix``,
a denormalizer, BPE models with unused pieces, and word/char model types.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from cpt_jax import atomic

SPACE = "\u2581"  # SentencePiece's escaped whitespace "▁"
# Unigram score of pieces SentencePiece never produces from text (control, unknown, byte):
# low enough that a path through them never wins while the text's characters are in the
# vocabulary.
_NEVER = -1e6

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json")


class TokenizerExportError(ValueError):
    """A SentencePiece model this exporter cannot reproduce exactly; says which option."""


def _model_pb2():
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # the generated module needs the protobuf runtime
        raise TokenizerExportError(
            f"reading a SentencePiece model proto needs protobuf ({e}); "
            "pip install protobuf") from None
    return sentencepiece_model_pb2


def parse_model(model_proto: bytes):
    """The ``ModelProto`` message of a serialized SentencePiece model."""
    m = _model_pb2().ModelProto()
    m.ParseFromString(model_proto)
    if not m.pieces:
        raise TokenizerExportError("the SentencePiece model has no pieces; is it a .model file?")
    return m


def _check_supported(m) -> None:
    pb = _model_pb2()
    if m.trainer_spec.treat_whitespace_as_suffix:
        raise TokenizerExportError("SentencePiece model uses treat_whitespace_as_suffix, "
                                   "which the export does not reproduce; retrain without it")
    if m.HasField("denormalizer_spec") and m.denormalizer_spec.precompiled_charsmap:
        raise TokenizerExportError("SentencePiece model has a denormalizer, which the export "
                                   "does not reproduce; retrain without one")
    kind = m.trainer_spec.model_type
    if kind not in (pb.TrainerSpec.BPE, pb.TrainerSpec.UNIGRAM):
        raise TokenizerExportError(
            f"SentencePiece model type {pb.TrainerSpec.ModelType.Name(kind)} cannot be "
            "exported; only BPE and UNIGRAM models can")
    if kind == pb.TrainerSpec.BPE and any(p.type == p.UNUSED for p in m.pieces):
        raise TokenizerExportError("BPE SentencePiece model with UNUSED pieces (they are "
                                   "re-segmented when encoding); the export does not "
                                   "reproduce that")


def _normalizer(m) -> dict | None:
    spec = m.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        import base64
        steps.append({"type": "Precompiled", "precompiled_charsmap":
                      base64.b64encode(spec.precompiled_charsmap).decode()})
    if spec.remove_extra_whitespaces:
        steps.append({"type": "Replace", "pattern": {"Regex": r"\A +"}, "content": ""})
        steps.append({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "})
    if spec.add_dummy_prefix:
        steps.append({"type": "Prepend", "prepend": " "})  # only for non-empty text
    space = " "
    if spec.escape_whitespaces:
        steps.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE})
        space = SPACE
    if spec.remove_extra_whitespaces:
        steps.append({"type": "Replace", "pattern": {"Regex": re.escape(space) + r"+\z"},
                      "content": ""})
    return {"type": "Sequence", "normalizers": steps} if steps else None


def _decoder(m) -> dict:
    unk_surface = (m.trainer_spec.unk_surface if m.trainer_spec.HasField("unk_surface")
                   else " \u2047 ")  # SentencePiece's default, " ⁇ "
    steps = [{"type": "Replace", "pattern": {"Regex": r"\A" + re.escape(p.piece) + r"\z"},
              "content": unk_surface} for p in m.pieces if p.type == p.UNKNOWN]
    if m.normalizer_spec.escape_whitespaces:
        steps.append({"type": "Replace", "pattern": {"String": SPACE}, "content": " "})
    steps += [{"type": "ByteFallback"}, {"type": "Fuse"}]
    if m.normalizer_spec.add_dummy_prefix or m.normalizer_spec.remove_extra_whitespaces:
        steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {"type": "Sequence", "decoders": steps}


def bpe_merges(pieces: Iterable[tuple[str, float]]) -> list[tuple[str, str]]:
    """HF BPE merges (in rank order) that segment like SentencePiece's BPE.

    ``pieces``: the normal pieces with their scores. SentencePiece joins any two adjacent
    symbols whose concatenation is a piece, best score first; so every way of writing a
    piece as two pieces is a merge, ranked by the piece's score (a piece's splits in order
    of the split position).
    """
    score = dict(pieces)
    merges = []
    for piece, s in score.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in score and right in score:
                merges.append((-s, k, left, right))
    merges.sort(key=lambda t: (t[0], t[2] + t[3], t[1]))
    return [(left, right) for _, _, left, right in merges]


def _model(m) -> dict:
    pb = _model_pb2()
    byte_fallback = bool(m.trainer_spec.byte_fallback)
    unk_id = next((i for i, p in enumerate(m.pieces) if p.type == p.UNKNOWN), None)
    if m.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM:
        vocab = [[p.piece, float(p.score) if p.type in (p.NORMAL, p.USER_DEFINED) else _NEVER]
                 for p in m.pieces]
        return {"type": "Unigram", "unk_id": unk_id, "vocab": vocab,
                "byte_fallback": byte_fallback}
    normal = [(p.piece, p.score) for p in m.pieces if p.type == p.NORMAL]
    return {"type": "BPE", "dropout": None,
            "unk_token": m.pieces[unk_id].piece if unk_id is not None else None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None,
            "fuse_unk": True, "byte_fallback": byte_fallback, "ignore_merges": False,
            "vocab": {p.piece: i for i, p in enumerate(m.pieces)},
            "merges": [list(pair) for pair in bpe_merges(normal)]}


def special_ids(m) -> dict:
    """``{"bos": id, "eos": id, "pad": id, "unk": id}`` as the trainer spec sets them; an
    id is None when the model has no such piece (a Llama-2 model has no pad)."""
    t = m.trainer_spec
    n = len(m.pieces)
    return {k: (i if 0 <= i < n else None) for k, i in
            (("bos", t.bos_id), ("eos", t.eos_id), ("pad", t.pad_id), ("unk", t.unk_id))}


def _post_processor(m, add_bos: bool, add_eos: bool) -> dict | None:
    """TemplateProcessing: ``[BOS] $A [EOS]`` with BOS/EOS as asked."""
    ids = special_ids(m)
    ends = {}
    for kind, add in (("bos", add_bos), ("eos", add_eos)):
        if add and ids[kind] is None:
            raise TokenizerExportError(f"the SentencePiece model has no {kind} piece to add")
        if add:
            ends[kind] = m.pieces[ids[kind]].piece
    if not ends:
        return None

    def template(seq: str, type_id: int) -> list:
        special = lambda kind: [{"SpecialToken": {"id": ends[kind], "type_id": type_id}}
                                ] if kind in ends else []
        return special("bos") + [{"Sequence": {"id": seq, "type_id": type_id}}] + special("eos")

    return {"type": "TemplateProcessing", "single": template("A", 0),
            "pair": template("A", 0) + template("B", 1),
            "special_tokens": {piece: {"id": piece, "ids": [ids[kind]], "tokens": [piece]}
                               for kind, piece in ends.items()}}


def tokenizer_json(model_proto: bytes, *, add_bos: bool = True, add_eos: bool = False) -> dict:
    """The ``tokenizer.json`` content reproducing the SentencePiece model (module docstring)."""
    m = parse_model(model_proto)
    _check_supported(m)
    added = [{"id": i, "content": p.piece, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": p.type == p.USER_DEFINED,
              "special": p.type == p.CONTROL}
             for i, p in enumerate(m.pieces) if p.type in (p.CONTROL, p.USER_DEFINED)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": _normalizer(m), "pre_tokenizer": None,
            "post_processor": _post_processor(m, add_bos, add_eos),
            "decoder": _decoder(m), "model": _model(m)}


def save_hf_tokenizer(model_proto: bytes, out_dir: str, *, model_max_length: int,
                      add_bos: bool = True, add_eos: bool = False) -> list[str]:
    """Writes ``TOKENIZER_FILES`` into ``out_dir``; returns their paths.

    ``AutoTokenizer.from_pretrained(out_dir)`` (a ``PreTrainedTokenizerFast`` over
    ``tokenizer.json``; tested with transformers 5) and
    ``tokenizers.Tokenizer.from_file(out_dir + "/tokenizer.json")`` then encode like the
    SentencePiece model, adding BOS (``add_bos``) as training rows start with it.
    """
    m = parse_model(model_proto)
    ids = special_ids(m)
    special = {f"{k}_token": m.pieces[ids[k]].piece
               for k in ("bos", "eos", "unk", "pad") if ids[k] is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
              "add_bos_token": add_bos, "add_eos_token": add_eos,
              "split_special_tokens": True, "clean_up_tokenization_spaces": False,
              "model_max_length": int(model_max_length)}
    files = {
        "tokenizer.json": json.dumps(tokenizer_json(model_proto, add_bos=add_bos,
                                                    add_eos=add_eos),
                                     ensure_ascii=False, indent=1).encode(),
        "tokenizer.model": model_proto,
        "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode(),
        "special_tokens_map.json": (json.dumps(special, indent=2) + "\n").encode(),
    }
    return atomic.write_files(out_dir, files)

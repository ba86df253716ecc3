"""The exported Hugging Face tokenizer encodes and decodes as SentencePiece does.

Reference: the SentencePiece model itself. Tiny models are trained here: the run's own
BPE and unigram tokenizers (``train_tokenizer``: identity normalizer, spaces kept, dummy
prefix, byte fallback, split digits), and BPE models with the other normalizer options
the exporter reads from the model (NFKC with extra whitespace removed; no dummy prefix;
no byte fallback). Strings: lines and whole-document slices of the three demo domains
(code indentation included) plus edge cases. Checked through ``tokenizers`` and, when it
is installed, ``transformers.AutoTokenizer``.
"""

import functools
import io
import json

import pytest
import sentencepiece as spm

from cpt_jax import hf_tokenizer as ht
from cpt_jax.data import sources
from cpt_jax.data import tokenizer as tk

tokenizers = pytest.importorskip("tokenizers")

DEMOS = ("python_docs", "python_code", "unicode_table")
EDGE = [
    "", " ", "  ", "x", " x", "  x", "x ", "x  ", " x ", "a  b   c", "\t", "\tx", "x\ty",
    "\n", "\n\n", "a\nb", " \n ", "\r\n", "    def f(x):\n        return x  # c\n",
    "\u00e9", "e\u0301", "\ufb01", "\uff21\uff22", "\u3000x", "a\u00a0b", "\ufeffx",
    "\U0001F600", "a\U0001F600b", " \U0001F600 ", "\u6f22\u5b57", " \u6f22\u5b57 x",
    "\u0416\u0438\u0437\u043d\u044c", "\u0645\u0631\u062d\u0628\u0627", "\x00", "\x7f",
    "<s>", "</s>", "<unk>", "<pad>", "a <s> b", "<0x41>", "\u2581", "\u2581x", "x\u2581",
    "\u2581\u2581 \u2581", "12345 678", "0x1F600", "a" * 300, " " * 50, "=" * 40,
    "U+0041;LATIN CAPITAL LETTER A;Lu;0;L;;;;;N;;;;0061;",
]


def demo_strings(per_domain=120):
    """Lines (indented ones first, then the rest) and 2000-character slices of each demo
    domain's first documents: a few hundred strings."""
    out = []
    for demo in DEMOS:
        docs = list(sources.iter_documents({"kind": "demo", "demo": demo, "max_chars": 20_000}))
        lines = [ln for d in docs for ln in d.split("\n")]
        indented = [ln for ln in lines if ln[:1] in (" ", "\t")]
        out += (indented[: per_domain // 2] + lines)[:per_domain]
        out += [d[:2000] for d in docs[:4]]
    return out


STRINGS = EDGE + demo_strings()

# (name, trainer arguments): the normalizer options the exporter must read from the model.
SPM_VARIANTS = {
    "bpe_nfkc_strip": dict(model_type="bpe", vocab_size=400, byte_fallback=True,
                           normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True),
    "bpe_no_dummy_prefix": dict(model_type="bpe", vocab_size=400, byte_fallback=True,
                                normalization_rule_name="identity",
                                remove_extra_whitespaces=False, add_dummy_prefix=False,
                                allow_whitespace_only_pieces=True),
    "bpe_no_byte_fallback": dict(model_type="bpe", vocab_size=200, byte_fallback=False,
                                 character_coverage=0.99, normalization_rule_name="identity",
                                 remove_extra_whitespaces=False,
                                 allow_whitespace_only_pieces=True),
}


@functools.lru_cache(maxsize=None)
def sample():
    return tuple(tk.sample_text([{"kind": "demo", "demo": d, "max_chars": 40_000}
                                 for d in DEMOS], 60_000))


@functools.lru_cache(maxsize=None)
def model_proto(name: str, tmp_dir: str) -> bytes:
    """Serialized SentencePiece model ``name``: ``run_bpe`` / ``run_unigram`` (the run's
    ``train_tokenizer``) or one of SPM_VARIANTS."""
    if name.startswith("run_"):
        doms = [{"name": d, "kind": "demo", "demo": d, "max_chars": 40_000} for d in DEMOS]
        tok = tk.train_tokenizer(doms, f"{tmp_dir}/{name}", 400, model_type=name[4:],
                                 sample_chars=60_000)
        return tok.sp.serialized_model_proto()
    f = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample()), model_writer=f, unk_id=0, bos_id=1, eos_id=2,
        pad_id=3, input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=8016, num_threads=1, minloglevel=2, **SPM_VARIANTS[name])
    return f.getvalue()


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_tok"))


def exported(name, tmp_dir):
    """(SentencePieceProcessor, export directory) for model ``name``."""
    proto = model_proto(name, tmp_dir)
    out = f"{tmp_dir}/export_{name}"
    ht.save_hf_tokenizer(proto, out, model_max_length=128)
    return spm.SentencePieceProcessor(model_proto=proto), out


def hf_tokenizer(out):
    tok = tokenizers.Tokenizer.from_file(f"{out}/tokenizer.json")
    tok.encode_special_tokens = True  # "<s>" in text is text (not stored in the file)
    return tok


def spells_hidden_piece(sp, text, ids):
    """``ids`` use a control piece that ``text`` spells with a character SentencePiece
    does not know (the unigram limit documented in cpt_jax.hf_tokenizer)."""
    return any(sp.is_control(i) and sp.id_to_piece(i) in text
               and any(sp.piece_to_id(c) == sp.unk_id() for c in sp.id_to_piece(i))
               for i in ids)


def assert_same_segmentation(sp, strings, got, exact=True):
    """Every ``got[i]`` is SentencePiece's ids for ``strings[i]``; for unigram models
    (``exact=False``) a different segmentation must score the same, to the float32
    rounding of SentencePiece's path sums, or be the documented hidden-piece case."""
    want = sp.encode(list(strings))
    bad, ties = [], 0
    for s, w, g in zip(strings, want, got):
        if w == g or (not exact and spells_hidden_piece(sp, s, g)):
            continue
        sw, sg = (sum(float(sp.get_score(i)) for i in ids) for ids in (w, g))
        tol = 2.0 ** -23 * sum(abs(float(sp.get_score(i))) for i in w) * len(w)
        if exact or abs(sw - sg) > tol or sp.decode(g) != sp.decode(w):
            bad.append((s[:60], sp.id_to_piece(w)[:12], sp.id_to_piece(g)[:12]))
        else:
            ties += 1
    assert not bad, f"{len(bad)} of {len(strings)} strings encode differently: {bad[:3]}"
    assert ties <= len(strings) // 20, f"{ties} unigram ties of {len(strings)}"


MODELS = ["run_bpe", "run_unigram", *SPM_VARIANTS]


@pytest.mark.parametrize("name", MODELS)
def test_tokenizers_library_encodes_and_decodes_as_sentencepiece(name, tmp_dir):
    sp, out = exported(name, tmp_dir)
    tok = hf_tokenizer(out)
    exact = not name.endswith("unigram")
    got = [e.ids for e in tok.encode_batch(STRINGS, add_special_tokens=False)]
    assert_same_segmentation(sp, STRINGS, got, exact)
    # the default adds BOS, as training rows begin with it
    bos = sp.bos_id()
    with_bos = [e.ids for e in tok.encode_batch(STRINGS)]
    assert all(w[0] == bos and w[1:] == g for w, g in zip(with_bos, got))
    # decode: SentencePiece's ids back to SentencePiece's text; BOS/EOS skipped as it does
    for s, ids in zip(STRINGS, sp.encode(STRINGS)):
        assert tok.decode(ids) == sp.decode(ids), s
        assert tok.decode([bos] + ids + [sp.eos_id()]) == sp.decode(ids), s


def test_the_check_detects_the_old_export(tmp_dir):
    """Guard on the test itself: the Metaspace set-up that transformers builds from a bare
    tokenizer.model (no dummy prefix before a leading space) fails it."""
    sp, out = exported("run_bpe", tmp_dir)
    spec = json.load(open(f"{out}/tokenizer.json"))
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": ht.SPACE,
                             "prepend_scheme": "first", "split": False}
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    assert sp.id_to_piece(sp.encode(" x")) == ["\u2581\u2581", "x"]  # dummy prefix + space
    assert tok.encode(" x", add_special_tokens=False).tokens == ["\u2581", "x"]
    with pytest.raises(AssertionError, match="encode differently"):
        assert_same_segmentation(
            sp, STRINGS, [e.ids for e in tok.encode_batch(STRINGS, add_special_tokens=False)])


@pytest.mark.parametrize("name", ["run_bpe", "bpe_nfkc_strip"])
def test_transformers_autotokenizer_matches_sentencepiece(name, tmp_dir):
    transformers = pytest.importorskip("transformers")
    sp, out = exported(name, tmp_dir)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    bos, eos = sp.bos_id(), sp.eos_id()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (
        bos, eos, sp.pad_id(), sp.unk_id())
    got = [tok.encode(s, add_special_tokens=False) for s in STRINGS]
    assert_same_segmentation(sp, STRINGS, got)
    assert tok(STRINGS)["input_ids"] == [[bos] + ids for ids in got]
    for s, ids in zip(STRINGS, got):
        assert tok.decode(ids) == sp.decode(ids), s
        assert tok.decode([bos] + ids + [eos], skip_special_tokens=True) == sp.decode(ids), s
    assert tok.decode([bos]) == "<s>"  # lm-evaluation-harness detects a BOS prefix by it
    assert tok.model_max_length == 128


def test_config_files(tmp_dir):
    sp, out = exported("run_bpe", tmp_dir)
    cfg = json.load(open(f"{out}/tokenizer_config.json"))
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"], cfg["pad_token"]) == (
        "<s>", "</s>", "<unk>", "<pad>")
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    assert json.load(open(f"{out}/special_tokens_map.json"))["pad_token"] == "<pad>"
    assert open(f"{out}/tokenizer.model", "rb").read() == sp.serialized_model_proto()


def test_unsupported_models_are_refused(tmp_dir):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(model_proto("run_bpe", tmp_dir))
    m.trainer_spec.treat_whitespace_as_suffix = True
    with pytest.raises(ht.TokenizerExportError, match="treat_whitespace_as_suffix"):
        ht.tokenizer_json(m.SerializeToString())
    m.trainer_spec.treat_whitespace_as_suffix = False
    m.trainer_spec.model_type = pb.TrainerSpec.WORD
    with pytest.raises(ht.TokenizerExportError, match="WORD cannot be exported"):
        ht.tokenizer_json(m.SerializeToString())
    with pytest.raises(ht.TokenizerExportError, match="no pieces"):
        ht.tokenizer_json(b"")

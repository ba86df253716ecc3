"""SentencePiece tokenizer: training, byte fallback, determinism, loading, vocab checks."""

import os

import pytest

from cpt_jax.data import tokenizer as tk
from cpt_jax.data.tokenizer import TokenizerError

DOMAINS = [{"kind": "demo", "demo": name, "max_chars": 20_000}
           for name in ("python_docs", "python_code", "unicode_table")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tk.train_tokenizer(DOMAINS, str(tmp_path_factory.mktemp("tok") / "t"), 512,
                              sample_chars=60_000)


def test_trained_ids_and_files(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 512
    assert os.path.isfile(tok.path)
    assert os.path.isfile(tok.path[:-len(".model")] + ".json")
    assert not [f for f in os.listdir(os.path.dirname(tok.path)) if ".tmp" in f]


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "def f(x):\n    return x  # comment\n\n\n",
    "Ünïcödé ✓ 你好 🦙 \t tabs",
    "  leading spaces and trailing  ",
])
def test_roundtrip_with_byte_fallback(tok, text):
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_unseen_characters_become_bytes(tok):
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("🦙")]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]


def test_encode_batch_matches_encode(tok):
    texts = ["a b c", "", "import os\n"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_training_is_deterministic_and_reused(tok, tmp_path):
    again = tk.train_tokenizer(DOMAINS, str(tmp_path / "t"), 512, sample_chars=60_000)
    assert again.sha256 == tok.sha256
    mtime = os.stat(again.path).st_mtime_ns
    reused = tk.train_tokenizer(DOMAINS, str(tmp_path / "t"), 512, sample_chars=60_000)
    assert os.stat(reused.path).st_mtime_ns == mtime
    assert reused.sha256 == tok.sha256
    other = tk.train_tokenizer(DOMAINS, str(tmp_path / "t"), 520, sample_chars=60_000)
    assert other.vocab_size == 520  # different inputs: trained again, same prefix


def test_load_tokenizer(tok, tmp_path):
    loaded = tk.load_tokenizer(tok.path)
    assert loaded.sha256 == tok.sha256 and loaded.vocab_size == tok.vocab_size
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.model").write_bytes(open(tok.path, "rb").read())
    assert tk.load_tokenizer(str(tmp_path / "hf")).sha256 == tok.sha256
    with pytest.raises(TokenizerError, match=r"does not exist"):
        tk.load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=r"is not a SentencePiece model"):
        tk.load_tokenizer(str(tmp_path / "junk.model"))


def test_check_vocab(tok):
    tk.check_vocab(tok, 512)
    tk.check_vocab(tok, 576)  # a padded embedding: rows the tokenizer never produces
    with pytest.raises(TokenizerError, match=r"512 tokens but the model has only 511 "
                                             r"embedding rows"):
        tk.check_vocab(tok, 511)


def test_bad_training_inputs(tmp_path):
    with pytest.raises(TokenizerError, match=r"model_type"):
        tk.train_tokenizer(DOMAINS, str(tmp_path / "t"), 512, model_type="wordpiece")
    with pytest.raises(TokenizerError, match=r"too small"):
        tk.train_tokenizer(DOMAINS, str(tmp_path / "t"), 100)
    with pytest.raises(TokenizerError, match=r"vocab_size=60000: SentencePiece can make at "
                       r"most \d+ pieces .* Lower model.vocab_size to at most \d+"):
        tk.train_tokenizer(DOMAINS[:1], str(tmp_path / "t"), 60_000, sample_chars=2000)
    assert not os.path.exists(tmp_path / "t.model")

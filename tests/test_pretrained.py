"""Continuing a pretrained Hugging Face checkpoint end to end, for a Llama-3-style one
(byte-level BPE tokenizer.json, special tokens at the end of the vocabulary, padded
embedding rows, rope_theta 500000 with llama3 RoPE scaling) and a Llama-2-style one
(SentencePiece tokenizer.model alone):

- the checkpoint is made here: a run pretrains a small model on "orig" text with that
  tokenizer, and ``convert_hf.py orbax-to-hf`` exports it;
- a second run continues the export on "new" text with no model keys and no tokenizer path;
- references: AutoTokenizer ids on hundreds of strings, the start loss recomputed document by
  document with a plain forward pass, a random model's loss, greedy decoding by full forward
  passes; and every refusal with its message.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import cli
from cpt_jax import model as model_lib
from cpt_jax.data import prepare as prepare_lib
from cpt_jax.data import tokenizer as tokenizer_lib
from cpt_jax.hf import load_hf_llama
from tests.tiny_runs import load_script

pytestmark = pytest.mark.slow

train_script = load_script("train")
convert_script = load_script("convert_hf")
generate_script = load_script("generate")

ORIG = {"name": "orig", "kind": "demo", "demo": "python_docs", "max_chars": 150_000}
NEW = {"name": "new", "kind": "demo", "demo": "unicode_table", "max_chars": 60_000}
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
            "<|eot_id|>"]
LLAMA3_MODEL = dict(vocab_size=448, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                    rope_theta=500000.0, max_seq_len=128, norm_eps=1e-5,
                    rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=16))
LLAMA2_MODEL = dict(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128,
                    max_seq_len=128, norm_eps=1e-6)

CONFIG = '''
import json
from cpt_jax.run_config import default_config


def get_config():
    c = default_config()
    for k, v in json.loads({model!r}).items():
        c.model[k] = v
    c.seq_len, c.global_batch = 32, 16
    c.data.domains = json.loads({domains!r})
    c.data.val_fraction = 0.1
    c.tasks = [{{"domain": {task!r}, "steps": {steps}}}]
    c.eval.update(dict(every=0, max_rows=16, batch=16))
    c.optim.update(dict(lr=3e-3, warmup_frac=0.05))
    c.checkpoint.update(dict(every=0, async_save=False))
    c.tokenizer.path = {tokenizer!r}
    c.tokenizer.sample_chars = 200_000
    c.init.hf = {init_hf!r}
    c.save_final_params = True
    return c
'''


def _write_config(path, *, model, domains, task, steps, tokenizer="", init_hf=""):
    path.write_text(CONFIG.format(model=json.dumps(model), domains=json.dumps(domains),
                                  task=task, steps=steps, tokenizer=tokenizer,
                                  init_hf=init_hf))
    return str(path)


def _run(capsys, script, argv):
    capsys.readouterr()
    code = cli.run_main(script.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _texts(n_chars=100_000):
    from cpt_jax.data import sources

    out, size = [], 0
    for d in (ORIG, NEW):
        for doc in sources.iter_documents({**d, "max_chars": n_chars // 2}):
            out.append(doc)
            size += len(doc)
    return out


def make_llama3_tokenizer(folder, *, specials_in_config=True):
    """A byte-level BPE tokenizer.json as Llama-3 ships it: BPE pieces first, the special
    tokens appended at the end of the vocabulary, BOS added by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(), trainer)
    tok.add_special_tokens(SPECIALS)
    bos = tok.token_to_id(SPECIALS[0])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[0]} $A", pair=f"{SPECIALS[0]} $A {SPECIALS[0]} $B",
        special_tokens=[(SPECIALS[0], bos)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072,
              "clean_up_tokenization_spaces": True}
    if specials_in_config:
        config.update(bos_token=SPECIALS[0], eos_token=SPECIALS[1])
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return folder


def parity_strings() -> list[str]:
    """Hundreds of strings: leading spaces, tabs, newlines, accents, CJK, emoji, code and
    literal special-token text, alone and in pairs, plus random mixtures."""
    base = ["hello world", " leading space", "  two leading", "\ttab\tseparated", "line\n",
            "a\n\nb\n\n\n", "café naïve résumé", "Ångström Ærø", "日本語のテキスト", "中文 测试",
            "emoji 🦙🔥👍🏽", "<|begin_of_text|>literal", "text <|end_of_text|> more",
            "<|eot_id|>", "  def f(x):\n    return x", "12345 67.89", "CRLF\r\nline", "",
            " ", "   ", "\n", "</s><s>", "<unk>", "x" * 50, "ALL CAPS", "don't won't",
            "0041;LATIN CAPITAL LETTER A;Lu;0;L;;;;;N;;;;0061;", "é", "e\u0301"]
    out = list(base) + [a + b for a in base[:16] for b in base[:16]]
    rng = np.random.default_rng(0)
    pool = list("abc xyz\n\tÉé中🦙<|>_") + ["<|end_of_text|>", "  ", "def "]
    out += ["".join(rng.choice(pool, size=rng.integers(1, 30))) for _ in range(100)]
    return out


# ----------------------------------------------------------------------------- tokenizers


def test_hf_json_ids_equal_autotokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    for variant, in_config in (("specials in tokenizer_config", True),
                               ("specials from config.json", False)):
        folder = make_llama3_tokenizer(str(tmp_path / variant), specials_in_config=in_config)
        if not in_config:
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump({"bos_token_id": 400, "eos_token_id": [401, 403]}, f)
        ours = tokenizer_lib.load_tokenizer(folder)
        auto = transformers.AutoTokenizer.from_pretrained(folder)
        strings = parity_strings()
        mismatches = [s for s in strings if ours.encode(s) != auto(
            s, add_special_tokens=False)["input_ids"]]
        assert not mismatches, (variant, mismatches[:3])
        assert ours.encode_batch(strings) == [ours.encode(s) for s in strings]
        assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (400, 401, 404)
        assert ours.stop_ids == ((401,) if in_config else (401, 403))
        assert ours.kind == "hf_json"
        # the file itself, or the folder: one tokenizer
        assert tokenizer_lib.load_tokenizer(os.path.join(folder, "tokenizer.json")).sha256 \
            == ours.sha256
        # a literal "<|end_of_text|>" in a document is that token, as in transformers
        assert 401 in ours.encode("a <|end_of_text|> b")


def test_saved_tokenizer_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = make_llama3_tokenizer(str(tmp_path / "orig"))
    tok = tokenizer_lib.load_tokenizer(folder)
    tok.save(str(tmp_path / "copy"), model_max_length=128)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "copy" / name).read_bytes() == (tmp_path / "orig" / name).read_bytes()
    assert tokenizer_lib.load_tokenizer(str(tmp_path / "copy")).sha256 == tok.sha256
    a = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "orig"))
    b = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "copy"))
    assert all(a(s)["input_ids"] == b(s)["input_ids"] for s in parity_strings())


def test_tokenizer_refusals(tmp_path):
    tiktoken = tmp_path / "meta" / "tokenizer.model"
    tiktoken.parent.mkdir()
    tiktoken.write_text("IQ== 0\nIg== 1\nIw== 2\nJA== 3\n")  # base64 token, rank
    with pytest.raises(tokenizer_lib.TokenizerError, match=r"tiktoken.*tokenizer.json of the "
                       r"Hugging Face release"):
        tokenizer_lib.load_tokenizer(str(tmp_path / "meta"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(tokenizer_lib.TokenizerError, match=r"holds no tokenizer.json or "
                       r"tokenizer.model"):
        tokenizer_lib.load_tokenizer(str(tmp_path / "empty_dir"))
    (tmp_path / "e.json").write_text("")
    with pytest.raises(tokenizer_lib.TokenizerError, match=r"is empty"):
        tokenizer_lib.load_tokenizer(str(tmp_path / "e.json"))
    folder = make_llama3_tokenizer(str(tmp_path / "noeos"), specials_in_config=False)
    with open(os.path.join(folder, "tokenizer.json")) as f:
        spec = json.load(f)
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != SPECIALS[1]]
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    with pytest.raises(tokenizer_lib.TokenizerError, match=r"names no EOS token"):
        tokenizer_lib.load_tokenizer(folder)


# ----------------------------------------------------------------------------- end to end


def _pretrain(tmp_path_factory, capsys_unused, name, model, tokenizer):
    """Pretrain on ``orig`` and export: the stand-in for a downloaded checkpoint."""
    base = tmp_path_factory.mktemp(name)
    config = _write_config(base / "pre.py", model=model, domains=[ORIG], task="orig",
                           steps=80, tokenizer=tokenizer)
    code = cli.run_main(train_script.main, ["--config", config, "--workdir", str(base / "pre")])
    assert code == 0
    code = convert_script.main(["orbax-to-hf", "--ckpt", str(base / "pre" / "final_params"),
                                "--out", str(base / "ckpt")])
    assert code == 0
    return base


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    base = tmp_path_factory.mktemp("llama3_tok")
    folder = make_llama3_tokenizer(str(base / "tok"))
    out = _pretrain(tmp_path_factory, None, "llama3", LLAMA3_MODEL,
                    os.path.join(folder, "tokenizer.json"))
    return out, folder


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    out = _pretrain(tmp_path_factory, None, "llama2", LLAMA2_MODEL, "")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        os.remove(out / "ckpt" / name)  # as Llama-2's original release: tokenizer.model
    return out, None


def _continue(capsys, base, extra=(), workdir="cont"):
    config = _write_config(base / "cont.py", model={}, domains=[ORIG, NEW], task="new",
                           steps=4, init_hf=str(base / "ckpt"))
    return _run(capsys, train_script, ["--config", config, "--workdir", base / workdir, *extra])


def _doc_loss(config, params, tokens_L, segs_L):
    """Mean next-token loss of each document of a packed row, run alone (no segment ids)
    through the model, log-softmax in numpy: (sum, count)."""
    total, count = 0.0, 0
    for s in np.unique(segs_L[segs_L > 0]):
        doc = tokens_L[segs_L == s]
        if len(doc) < 2:
            continue
        logits = np.asarray(model_lib.forward(config, params, jnp.asarray(doc[None, :-1])),
                            np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= logp[np.arange(len(doc) - 1), doc[1:]].sum()
        count += len(doc) - 1
    return total, count


@pytest.mark.parametrize("which", ["llama3", "llama2"])
def test_continue_a_checkpoint_with_no_model_keys_and_no_tokenizer(which, request, capsys):
    base, tok_folder = request.getfixturevalue(which)
    code, out, err = _continue(capsys, base)
    assert code == 0, err
    res = json.loads((base / "cont" / "results.json").read_text())
    hf_config, hf_params = load_hf_llama(base / "ckpt")
    model = LLAMA3_MODEL if which == "llama3" else LLAMA2_MODEL
    for k, v in model.items():  # the checkpoint's model, padded rows and RoPE included
        assert res["config"]["model"][k] == v, k
    start, random = res["init_losses"]["orig"], res["init_losses_random"]["orig"]
    assert start < random - 1.5, (start, random)  # the pretrained model knows its text

    # the start loss, recomputed document by document with a plain forward pass
    tok = tokenizer_lib.load_tokenizer(base / "ckpt")
    prepared = prepare_lib.prepare_domain(ORIG, tok, str(base / "cont" / "data"), 32, 0.1, 0,
                                          progress=False)
    tokens, segs = prepared["val"].read(np.arange(min(16, len(prepared["val"]))))
    sums = [_doc_loss(hf_config, hf_params, t, s) for t, s in zip(tokens, segs)]
    assert start == pytest.approx(sum(a for a, _ in sums) / sum(b for _, b in sums), abs=2e-4)

    # rows are [BOS] doc [EOS] with the checkpoint's ids
    first = tokens[0][segs[0] == segs[0][0]]
    assert first[0] == tok.bos_id
    assert (tok.bos_id, tok.eos_id) == ((400, 401) if which == "llama3" else (1, 2))

    # the export carries the tokenizer: same files, same ids
    code, _, err = _run(capsys, convert_script, [
        "orbax-to-hf", "--ckpt", base / "cont" / "final_params", "--out", base / "export"])
    assert code == 0 and "warning" not in err, err
    exported = tokenizer_lib.load_tokenizer(base / "export")
    strings = parity_strings()
    assert [exported.encode(s) for s in strings] == [tok.encode(s) for s in strings]
    names = ["tokenizer.json", "tokenizer_config.json"] if which == "llama3" else [
        "tokenizer.model"]
    for name in names:
        assert (base / "export" / name).read_bytes() == (base / "ckpt" / name).read_bytes()
    cfg = json.loads((base / "export" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (
        tok.bos_id, tok.eos_id, model["vocab_size"])

    # generate.py on the continued checkpoint: greedy = full forward passes
    code, out, err = _run(capsys, generate_script, [
        "--ckpt", base / "cont", "--prompt", "The ", "--max_new_tokens", "6", "--json"])
    assert code == 0, err
    row = json.loads(out.splitlines()[0])
    config, params = load_hf_llama(base / "export")
    seq = [tok.bos_id] + tok.encode("The ")
    for _ in range(len(row["ids"])):
        logits = np.asarray(model_lib.forward(config, params, jnp.asarray([seq])))[0, -1]
        seq.append(int(np.argmax(logits)))
    assert row["ids"] == seq[len(seq) - len(row["ids"]):]


def test_contradicting_model_keys_and_pretrained_tokenizer_refusals(llama3, capsys, tmp_path):
    base, tok_folder = llama3
    for key, value in (("rope_theta", "10000"), ("norm_eps", "1e-6"), ("d_model", "128"),
                       ("vocab_size", "404")):
        code, _, err = _continue(capsys, base, [f"--config.model.{key}={value}"],
                                 workdir="refused")
        assert code == 2 and f"model.{key}=" in err and "contradicts the checkpoint" in err, err
        assert f"{key}={LLAMA3_MODEL[key]} in its config.json" in err, err
        assert not (base / "refused").exists()
    # the same value as the checkpoint is fine to state
    config = _write_config(tmp_path / "same.py", model={"rope_theta": 500000.0}, domains=[ORIG],
                           task="orig", steps=1, init_hf=str(base / "ckpt"))
    from cpt_jax.run_config import check_config
    check_config(cli.load_config(config, []))

    # a pretrained start never trains a tokenizer: without one, an error says what to give
    bare = tmp_path / "bare"
    shutil.copytree(base / "ckpt", bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        os.remove(bare / name)
    config = _write_config(tmp_path / "bare.py", model={}, domains=[ORIG], task="orig",
                           steps=1, init_hf=str(bare))
    code, _, err = _run(capsys, train_script, ["--config", config, "--workdir",
                                               tmp_path / "w1"])
    assert code == 2 and "holds no tokenizer" in err and "tokenizer.path" in err, err
    assert not (tmp_path / "w1").exists()
    # a tokenizer larger than the embedding
    big = tmp_path / "big"
    os.makedirs(big)
    tk = tokenizer_lib.train_tokenizer([ORIG], str(big / "sp"), 500, sample_chars=100_000)
    config = _write_config(tmp_path / "big.py", model={}, domains=[ORIG], task="orig",
                           steps=1, init_hf=str(bare), tokenizer=tk.path)
    code, _, err = _run(capsys, train_script, ["--config", config, "--workdir",
                                               tmp_path / "w2"])
    assert code == 2 and "500 tokens but the model has only 448 embedding rows" in err, err

"""Multiple-choice scoring: exact on a model whose log-probabilities are known by
construction, equal to a one-example-at-a-time brute force, and the evaluate.py CLI."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cpt_jax import sharding as sharding_lib
from cpt_jax.eval import downstream as ds
from cpt_jax.model import LlamaConfig, forward, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = LlamaConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=8,
                  max_seq_len=64, tie_embeddings=False)


class CharTokenizer:
    """One token per character: ' ' -> 2, 'a' -> 3, ..., 'z' -> 28; BOS = 1."""

    bos_id = 1
    vocab_size = 32
    chars = " abcdefghijklmnopqrstuvwxyz"

    def encode(self, text):
        return [2 + self.chars.index(c) for c in text]


TOK = CharTokenizer()


def _ids(text):
    return TOK.encode(text)


def random_params(cfg, seed, std=0.2):
    """Gaussian parameters of ``cfg``'s shapes, drawn with numpy (no XLA compile of an init
    function; threefry init compiles for seconds on CPU); norm scales are 1."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))

    def draw(path, s):
        if path[-1].key == "scale":
            return np.ones(s.shape, np.float32)
        return (std * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# ------------------------------------------------------------------ a bigram model by design


def bigram_table():
    """Logits B[prev, next]: each letter strongly predicts the next letter of the alphabet
    (z -> a), with a strength that varies by letter; BOS predicts 'a'; all else 0."""
    B = np.zeros((32, 32))
    for t in range(3, 29):
        B[t, 3 + (t - 3 + 1) % 26] = 4.0 + t % 3
    B[1, 3] = 5.0
    return B


def bigram_params(B):
    """Llama parameters that compute exactly the bigram model B.

    The attention output and MLP down projections are zero, so the residual stream at every
    position is the current token's embedding; embeddings are one-hot rows, so the final
    RMSNorm maps token t to onehot(t) / sqrt(1/D + eps), and the output projection row t is B[t]
    times sqrt(1/D + eps): the logits at a position are B[current token].
    """
    p = random_params(CFG, 0)
    p["layers"]["attn"]["o"]["kernel"][:] = 0.0
    p["layers"]["mlp"]["down"]["kernel"][:] = 0.0
    p["embed"]["embedding"] = np.eye(32, dtype=np.float32)
    p["final_norm"]["scale"][:] = 1.0
    p["lm_head"]["kernel"] = (B * math.sqrt(1.0 / 32 + CFG.norm_eps)).astype(np.float32)
    return p


def bigram_loglik(B, prefix_ids, cont_ids):
    """By hand: sum of log softmax(B[prev])[next] over the continuation tokens."""
    seq = [1] + prefix_ids + cont_ids
    total = 0.0
    for k in range(len(seq) - len(cont_ids), len(seq)):
        row = B[seq[k - 1]]
        total += row[seq[k]] - math.log(np.exp(row).sum())
    return total


ALPHABET_TASK = [  # the right answer continues the alphabet
    {"context": "abcd", "choices": ["efg", "gfe", "xyz"], "label": 0},
    {"context": "mno", "choices": ["qr", "pq", "pz"], "label": 1},
    {"context": "", "choices": ["bca", "abc"], "label": 1},          # BOS -> a
    {"context": "xy", "choices": ["zzz", "zab"], "label": 1},        # wraps around z -> a
    {"context": "ab ", "choices": ["cd", "de"], "label": 0},         # trailing space moves
]


def test_scores_equal_the_bigram_model_by_hand():
    B = bigram_table()
    params = bigram_params(B)
    reqs = ds.make_requests(TOK, ALPHABET_TASK)
    lls = ds.score_requests(CFG, params, reqs, batch_size=8)
    expected = []
    for ex in ALPHABET_TASK:
        ctx = ex["context"]
        for c in ex["choices"]:
            if ctx.endswith(" "):  # the harness scores " cd" after "ab"
                expected.append(bigram_loglik(B, _ids(ctx[:-1]), _ids(" " + c)))
            else:
                expected.append(bigram_loglik(B, _ids(ctx), _ids(c)))
    np.testing.assert_allclose(lls, expected, rtol=1e-5, atol=1e-4)
    # "cd" after "ab ": the space is an unlikely token after b, but both choices share it
    res = ds.evaluate_tasks(CFG, params, TOK, {"alphabet": ALPHABET_TASK}, batch_size=8)
    assert res["alphabet"]["acc"] == 1.0 and res["alphabet"]["n"] == 5
    assert res["alphabet"]["chance"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2 + 1 / 2 + 1 / 2) / 5)


def test_batched_equals_brute_force_on_every_mesh():
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    task = []
    for i in range(11):  # 11 examples, 2-4 choices: 32 rows, not a multiple of 24
        # few distinct lengths (context 3 or 17, choice 1 or 6), so the brute force below
        # compiles forward for only four shapes
        ctx = "".join(rng.choice(letters, size=rng.choice([3, 17])))
        choices = ["".join(rng.choice(letters, size=rng.choice([1, 6])))
                   for _ in range(rng.integers(2, 5))]
        task.append({"context": ctx, "choices": choices, "label": 0})
    params = random_params(CFG, 1)
    reqs = ds.make_requests(TOK, task)
    assert len(reqs) == 32 and len({len(t) for t, _ in reqs}) == 4

    fwd = jax.jit(lambda p, x: jax.nn.log_softmax(forward(CFG, p, x), -1))
    brute = []
    for tokens, n_cont in reqs:  # one unpadded sequence at a time
        logp = np.asarray(fwd(params, np.asarray(tokens)[None, :-1]))[0]
        brute.append(sum(logp[k - 1, tokens[k]] for k in range(len(tokens) - n_cont,
                                                                len(tokens))))
    meshes = [sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}),
              sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": -1})]
    # all devices on the data axis, 8 rows a batch, default window (32); and data x fsdp x
    # tensor sharding with parameters split over the tensor axis, 24-row batches, window 48
    for mesh, batch_size, seq_len in ((meshes[0], 8, None), (meshes[1], 24, 48)):
        lls = ds.score_requests(CFG, params, reqs, batch_size=batch_size, seq_len=seq_len,
                                mesh=mesh)
        np.testing.assert_allclose(lls, brute, rtol=1e-6, atol=1e-5)


def test_choice_metrics_by_hand():
    examples = [{"context": "", "choices": ["a", "bbbb"], "label": 1},
                {"context": "", "choices": ["aa", "b", "cc"], "label": 2}]
    # ex 0: raw -1 > -2 picks "a" (wrong); per char -1/1 < -2/4 picks "bbbb" (right);
    #       per token (1 and 2 tokens) -1 vs -1 ties -> first (wrong).
    # ex 1: raw picks "cc" (right); per char -3/2, -1/1, -0.9/2 picks "cc" (right);
    #       per token (2, 1, 1 tokens) -1.5, -1, -0.9 picks "cc" (right).
    lls = [-1.0, -2.0, -3.0, -1.0, -0.9]
    m = ds.choice_metrics(examples, lls, n_tokens=[1, 2, 2, 1, 1])
    assert m == {"acc": 0.5, "acc_norm": 1.0, "acc_norm_token": 0.5,
                 "chance": pytest.approx((1 / 2 + 1 / 3) / 2), "n": 2}
    with pytest.raises(ValueError, match="6 log-likelihoods for 5 choices"):
        ds.choice_metrics(examples, lls + [0.0])


def test_encode_pair_and_truncation():
    assert ds.encode_pair(TOK, "ab ", "cd") == (_ids("ab"), _ids(" cd"))
    assert ds.encode_pair(TOK, "", "cd") == ([], _ids("cd"))
    ex = [{"context": "abcdefghij", "choices": ["klm", "xyz"], "label": 0}]
    reqs = ds.make_requests(TOK, ex, max_tokens=6)  # keep the last 6 of BOS + 10 + 3
    assert reqs[0] == (_ids("hijklm"), 3)
    with pytest.raises(ds.TaskError, match=r"choice 'klm' has 3 tokens"):
        ds.make_requests(TOK, ex, max_tokens=3)


def test_task_file_errors_name_the_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n\n'
                 '{"context": "a", "choices": ["b", "c"], "label": 2}\n')
    with pytest.raises(ds.TaskError, match=r"t.jsonl:3: label=2 must be an int index"):
        ds.load_task(str(p))
    p.write_text('{"context": "a", "choices": ["b"], "label": 0}\n')
    with pytest.raises(ds.TaskError, match=r"t.jsonl:1: choices must be a list of at least 2"):
        ds.load_task(str(p))
    p.write_text('{"context": "a"\n')
    with pytest.raises(ds.TaskError, match=r"t.jsonl:1: not valid JSON"):
        ds.load_task(str(p))
    assert ds.task_name("/x/hellaswag.jsonl") == "hellaswag"


# ------------------------------------------------------------------ scripts/evaluate.py


def test_evaluate_cli_scores_and_exports(tmp_path):
    from cpt_jax.data import tokenizer as tk
    from cpt_jax.hf import load_hf_llama
    from cpt_jax.train.checkpoint import save_params

    words = "the cat sat on a mat and dog ran fast slow red blue green one two".split()
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i in range(100):
            f.write(json.dumps({"text": " ".join(words[(i * 7 + j * 3) % len(words)]
                                                 for j in range(30))}) + "\n")
    tok = tk.train_tokenizer([{"name": "c", "kind": "jsonl", "pattern": str(corpus),
                               "field": "text"}], str(tmp_path / "tok"), 300,
                             sample_chars=50_000)
    cfg = LlamaConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                      d_ff=64, max_seq_len=64)
    params = random_params(cfg, 2, std=0.02)
    save_params(tmp_path / "ckpt", cfg, params)
    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps(e) + "\n" for e in [
        {"context": "the cat sat on", "choices": [" a mat", " the dog"], "label": 0},
        {"context": "red blue", "choices": [" green", " one two"], "label": 0},
        {"context": "the dog ran", "choices": [" fast", " slow", " red"], "label": 0}]))
    out = tmp_path / "scores.json"
    hf_dir = tmp_path / "hf"
    lm_dir = tmp_path / "lm_eval_tasks"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"),
         "--ckpt", str(tmp_path / "ckpt"), "--tasks", str(task), "--tokenizer", tok.path,
         "--hf_export", str(hf_dir), "--out", str(out), "--batch_size", "8",
         "--lm_eval_config", str(lm_dir)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(out.read_text())
    toy = scores["tasks"]["toy"]
    assert toy["n"] == 3 and 0.0 <= toy["acc"] <= 1.0
    assert toy["chance"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)
    # the CLI scores what the library scores, item by item and choice by choice
    examples = ds.load_task(str(task))
    lib = ds.evaluate_tasks(cfg, params, tok, {"toy": examples})
    assert toy == pytest.approx(lib["toy"])
    reqs = ds.make_requests(tok, examples)
    want = ds.score_requests(cfg, params, reqs)
    items = scores["items"]["toy"]
    assert [len(it["loglik"]) for it in items] == [2, 2, 3]
    np.testing.assert_allclose([x for it in items for x in it["loglik"]], want, rtol=1e-6)
    assert [n for it in items for n in it["n_tokens"]] == [n for _, n in reqs]

    assert sorted(os.listdir(hf_dir)) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert (hf_dir / "tokenizer.model").read_bytes() == open(tok.path, "rb").read()
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert tc["add_bos_token"] is True
    assert (tc["bos_token"], tc["eos_token"], tc["unk_token"]) == ("<s>", "</s>", "<unk>")
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == (1, 2, 3)
    cfg2, params2 = load_hf_llama(str(hf_dir))
    assert cfg2.vocab_size == 300
    np.testing.assert_array_equal(params2["layers"]["mlp"]["up"]["kernel"],
                                  params["layers"]["mlp"]["up"]["kernel"])
    assert f"lm_eval --model hf --model_args pretrained={hf_dir}" in proc.stdout
    assert "add_bos_token=True --tasks hellaswag,piqa,arc_easy,arc_challenge" in proc.stdout

    # the local lm-eval task: the same items, the native prompt
    yaml_text = (lm_dir / "toy.yaml").read_text()
    for line in ("task: toy", "dataset_path: json", f"test: {json.dumps(str(lm_dir / 'toy.jsonl'))}",
                 "output_type: multiple_choice", "doc_to_text: context",
                 "doc_to_choice: choices", "doc_to_target: label", 'target_delimiter: ""'):
        assert line in yaml_text.splitlines() or "    " + line in yaml_text.splitlines(), line
    assert ds.load_task(str(lm_dir / "toy.jsonl")) == examples
    assert f"--include_path {lm_dir} --tasks toy" in proc.stdout


def test_evaluate_cli_errors(tmp_path):
    script = os.path.join(ROOT, "scripts", "evaluate.py")
    proc = subprocess.run([sys.executable, script, "--ckpt", str(tmp_path / "nope"),
                           "--tasks", "x.jsonl"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope" in proc.stderr and "save_params" in proc.stderr


def test_evaluate_finds_the_run_tokenizer(tmp_path):
    from cpt_jax.data import tokenizer as ev  # shared by evaluate, convert_hf and generate

    work = tmp_path / "run"
    (work / "data").mkdir(parents=True)
    config = {"model": {"vocab_size": 300}, "tokenizer": {"path": "", "model_type": "bpe"},
              "data": {"cache_dir": ""}}
    (work / "results.json").write_text(json.dumps({"config": config}))
    ckpt = str(work / "final_params")
    assert ev.find_run_tokenizer(ckpt) is None          # trained tokenizer not there
    (work / "data" / "tokenizer-bpe-300.model").write_bytes(b"x")
    assert ev.find_run_tokenizer(ckpt) == str(work / "data" / "tokenizer-bpe-300.model")
    config["data"]["cache_dir"] = str(tmp_path / "cache")  # a shared cache_dir wins
    (work / "results.json").write_text(json.dumps({"config": config}))
    assert ev.find_run_tokenizer(ckpt) is None
    config["tokenizer"]["path"] = "/models/llama2/tokenizer.model"  # an explicit path wins
    (work / "results.json").write_text(json.dumps({"config": config}))
    assert ev.find_run_tokenizer(ckpt) == "/models/llama2/tokenizer.model"
    assert ev.find_run_tokenizer(str(tmp_path / "elsewhere" / "ckpt")) is None
    (work / "tokenizer").mkdir()  # the run's own copy wins, from any of its checkpoints
    assert ev.find_run_tokenizer(ckpt) == str(work / "tokenizer")
    assert ev.find_run_tokenizer(str(work / "checkpoints" / "40")) == str(work / "tokenizer")

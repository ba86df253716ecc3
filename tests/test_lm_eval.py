"""lm-evaluation-harness, run on the Hugging Face export of a model, gives the same per-choice
log-likelihoods as the native JAX scorer on the same local task. Skipped unless lm_eval
(and torch) are installed: they are not dependencies of cpt_jax."""

import json

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("torch")

from cpt_jax.data import tokenizer as tk  # noqa: E402
from cpt_jax.eval import downstream as ds  # noqa: E402
from cpt_jax.eval import lm_eval_task  # noqa: E402
from cpt_jax.hf import save_hf_llama  # noqa: E402
from cpt_jax.model import LlamaConfig  # noqa: E402

from test_downstream import random_params  # noqa: E402

# Contexts that start with indentation, spaces, tabs or newlines (where a tokenizer without
# SentencePiece's dummy prefix differs), end in spaces (moved to the continuation), or hold
# characters outside the vocabulary (byte fallback).
ITEMS = [
    ("    return x", [" + 1", " * 2"]),
    ("  def f(a, b):\n", ["    return a", "    pass"]),
    (" import os", ["\nimport sys", "\n"]),
    ("\tfor i in range(3):", ["\n\t\tprint(i)", " pass"]),
    ("\n\nclass A:", ["\n    x = 1", " pass"]),
    ("if x == 1: ", ["return", "pass"]),
    ("   # a comment  ", ["here", "  there"]),
    ("        self.assertEqual(", ["a, b)", "x)"]),
    ("x = [1,\n     2,", [" 3]", "\n     3]"]),
    (" The Python tutorial", [" is here.", " was there."]),
    ("with open(path) as f:", ["\n    data = f.read()", " pass"]),
    ("  \u00e9t\u00e9", [" \U0001F600", " caf\u00e9"]),
    ("try:\n    pass\nexcept", [" ValueError:", " KeyError:"]),
    ("   ", ["x", " y"]),
    ("print(", ["'hello')", '"world")']),
    ("0041;LATIN CAPITAL LETTER A;", ["Lu;0;L", "Ll;0;L"]),
    ("  elif", [" y:", " z :"]),
    ("\n", ["    x", "y"]),
    ("", ["import os", "    pass"]),  # empty context: BOS alone conditions the choice
    ("  return\t", ["None", " True"]),
]


def test_lm_eval_matches_native_scorer(tmp_path, monkeypatch):
    domains = [{"name": d, "kind": "demo", "demo": d, "max_chars": 40_000}
               for d in ("python_docs", "python_code")]
    tok = tk.train_tokenizer(domains, str(tmp_path / "tok"), 400, sample_chars=60_000)
    cfg = LlamaConfig(vocab_size=400, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      d_ff=64, max_seq_len=64)
    params = random_params(cfg, 3, std=0.3)  # far from uniform: tokenization matters
    hf_dir = save_hf_llama(cfg, params, tmp_path / "hf", tokenizer=tok)

    task = tmp_path / "indent.jsonl"
    task.write_text("".join(json.dumps({"context": c, "choices": ch, "label": 0}) + "\n"
                            for c, ch in ITEMS))
    examples = ds.load_task(str(task))
    native = ds.score_tasks(cfg, params, tok, {"indent": examples})["indent"]

    name = lm_eval_task.write_lm_eval_task(str(task), str(tmp_path / "tasks"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the task's data is a local file
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32,add_bos_token=True",
        tasks=[name], batch_size=8, device="cpu", log_samples=True,
        task_manager=lm_eval.tasks.TaskManager(include_path=str(tmp_path / "tasks")))
    harness = lm_eval_task.sample_logliks(results["samples"][name])

    want = np.array([x for it in native for x in it["loglik"]])
    got = np.array([x for item in harness for x in item])
    assert got.shape == want.shape == (40,)
    assert np.abs(want).min() > 1.0  # real scores, not empty continuations
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)

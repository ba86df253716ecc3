"""scripts/modules.py: bad input is one error line and exit status 2 with nothing written;
on a tiny finished run it writes modules.json, the figure, masks and masked params
checkpoints that load and score as the masks say."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpt_jax import cli
from tiny_runs import load_script, tiny_run_config

modules_script = load_script("modules")
train_script = load_script("train")


def _run(capsys, argv):
    capsys.readouterr()
    code = cli.run_main(modules_script.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _fake_run(root, with_params=True):
    """A workdir with results.json naming domains en, num (and final_params' config)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(
        {"config": {"data": {"domains": [{"name": "en"}, {"name": "num"}]}}}))
    if with_params:
        (root / "final_params").mkdir()
        (root / "final_params" / "model_config.json").write_text("{}")
    return root


@pytest.mark.parametrize("case, argv, words", [
    ("no such ckpt", ["--ckpt", "{tmp}/nope", "--domains", "en"], ["--ckpt", "no such"]),
    ("run without final params", ["--ckpt", "{bare}", "--domains", "en"],
     ["save_final_params=True"]),
    ("unknown domain", ["--ckpt", "{run}", "--domains", "en,fr"], ["--domains", "['en', 'num']"]),
    ("one-domain recomposition", ["--ckpt", "{run}", "--domains", "en,num", "--recompose", "en"],
     ["--recompose en", "2 or more"]),
    ("recomposition of a domain not given", ["--ckpt", "{run}", "--domains", "en",
                                             "--recompose", "en+num"], ["--recompose en+num"]),
    ("zero steps", ["--ckpt", "{run}", "--domains", "en", "--steps", "0"], ["--steps"]),
    ("out not empty", ["--ckpt", "{run}", "--domains", "en", "--out", "{run}"],
     ["--out", "--overwrite"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, argv, words):
    run = _fake_run(tmp_path / "run")
    bare = _fake_run(tmp_path / "bare", with_params=False)
    argv = [a.format(tmp=tmp_path, run=run, bare=bare) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code, _, err = _run(capsys, argv)
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2, (case, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (case, lines[0])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_tiny_run_end_to_end(tmp_path, capsys):
    from cpt_jax import modules
    from cpt_jax.hf import load_hf_llama, save_hf_llama
    from cpt_jax.train.checkpoint import load_params

    words = {"en": "the cat sat on a mat while every small dog ran over green hills".split(),
             "num": [str(i) for i in range(60)]}
    domains = []
    for name, vocab in words.items():
        (tmp_path / name).mkdir()
        _write_jsonl(tmp_path / name / "p.jsonl",
                     [" ".join(vocab[(d * 7 + i * i) % len(vocab)] for i in range(40))
                      for d in range(40)])
        domains.append({"name": name, "kind": "jsonl", "field": "text",
                        "pattern": str(tmp_path / name / "*.jsonl")})
    cfg = tmp_path / "cfg.py"
    cfg.write_text(tiny_run_config(json.dumps(domains), str(tmp_path / "cache"),
                                   vocab_size=320, steps=4, keep=1))
    run = tmp_path / "run"
    assert cli.run_main(train_script.main, ["--config", str(cfg), "--workdir", str(run),
                                            "--config.save_final_params=True",
                                            "--config.checkpoint.every=0"]) == 0
    out = tmp_path / "mods"
    code, stdout, err = _run(capsys, ["--ckpt", run, "--domains", "num,en", "--recompose",
                                      "en+num", "--out", out, "--steps", "3", "--batch", "8"])
    assert code == 0, err
    res = json.loads((out / "modules.json").read_text())
    results = json.loads((run / "results.json").read_text())
    # the full model's losses are the run's own final evaluation (same rows, same weights)
    for j, d in enumerate(results["domains"]):
        assert res["full_losses"][d] == pytest.approx(results["loss_matrix"][-1][j], rel=1e-5)
    for name in ("module_en", "module_num", "recompose_en+num", "modules.png", "masks.npz"):
        assert (out / name).exists(), name
    masks = np.load(out / "masks.npz")
    _, full = load_params(run / "final_params")
    cfg_m, en = load_params(out / "module_en")
    kept = 0
    for key in masks.files:
        domain, name = key.split("/", 1)
        node_full, node_en = full, en
        for k in name.split("/"):
            node_full, node_en = node_full[k], node_en[k]
        if domain == "en":  # the checkpoint is the weights with the mask's zeros
            np.testing.assert_array_equal(node_en, np.where(masks[key] > 0, node_full, 0))
            kept += int(masks[key].sum())
    assert res["modules"]["en"]["density"] == pytest.approx(
        kept / res["masked"]["weights"])
    # the union recomposition's density, from the stored masks
    union = sum(int(np.logical_or(masks[f"en/{n}"], masks[f"num/{n}"]).sum())
                for n in res["masked"]["tensors"])
    assert res["recompositions"]["en+num"]["density"] == pytest.approx(
        union / res["masked"]["weights"])
    assert res["overlap"]["matrix"][0][1] == pytest.approx(modules.jaccard(
        {n: masks[f"num/{n}"] for n in res["masked"]["tensors"]},
        {n: masks[f"en/{n}"] for n in res["masked"]["tensors"]}))
    save_hf_llama(cfg_m, en, tmp_path / "hf")  # the HF export takes a module checkpoint
    _, back = load_hf_llama(tmp_path / "hf")
    assert float(np.asarray(back["layers"]["mlp"]["up"]["kernel"] == 0).mean()) >= \
        float(np.asarray(masks["en/layers/mlp/up/kernel"] == 0).mean())

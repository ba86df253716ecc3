"""The second reliability catalogue: cases that used to give a wrong or unsafe result
without an error, or a traceback instead of one line. Each test fails on the code before
the fix (a silent success, or another exception)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cpt_jax import cli
from cpt_jax.data import tokenizer as tokenizer_lib
from cpt_jax.hf import load_hf_llama
from cpt_jax.train import checkpoint as checkpoint_lib
from cpt_jax.train.loop import run
from cpt_jax.train.workdir_lock import LOCK_FILE, WorkdirLock
from test_train_loop import _config
from tiny_runs import load_script

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures" / "hf"
train_script = load_script("train")
convert_script = load_script("convert_hf")
evaluate_script = load_script("evaluate")


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "error: " in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def _tiny(tmp_path, **kw):
    c = _config(tmp_path)
    c.tasks = [{"domain": "en", "steps": 2}, {"domain": "num", "steps": 2}]
    c.eval.every = 0
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run that several cases read: 3 tasks of 2 steps (ends at 2, 4, 6), a
    checkpoint every step, the last one and the last 2 task ends kept, final params."""
    root = tmp_path_factory.mktemp("trained")
    c = _tiny(root)
    c.tasks = [{"domain": "en", "steps": 2}, {"domain": "num", "steps": 2},
               {"domain": "sym", "steps": 2}]
    c.replay.rate = 0.0
    c.tokenizer.sample_chars = 20_000
    c.checkpoint.update(dict(every=1, keep=1, keep_task_ends=2, async_save=False))
    c.save_final_params = True
    run(c, str(root / "a"))
    return root, c


def test_keep_task_ends_bounds_the_task_end_checkpoints(trained):
    root, _ = trained
    assert sorted(int(p) for p in os.listdir(root / "a" / "checkpoints") if p.isdigit()) == [
        4, 6]  # every task end would be [2, 4, 6]


def test_shared_cache_export_ships_each_runs_own_tokenizer(trained, tmp_path):
    """Case 1: two runs with one data.cache_dir, the same vocab size and different
    tokenizer.sample_chars: the second retrains the cache's tokenizer; the first run's
    export must still carry the tokenizer the first run trained with."""
    root, _ = trained
    first = tokenizer_lib.load_tokenizer(root / "a" / "tokenizer").sha256
    b = _tiny(root)  # the same data.cache_dir
    b.tasks = [{"domain": "en", "steps": 1}]
    b.tokenizer.sample_chars = 7_000
    run(b, str(tmp_path / "b"))
    assert tokenizer_lib.load_tokenizer(tmp_path / "b" / "tokenizer").sha256 != first
    code = convert_script.main(["orbax-to-hf", "--ckpt", str(root / "a" / "final_params"),
                                "--out", str(tmp_path / "hf")])
    assert code == 0
    exported = (tmp_path / "hf" / "tokenizer.model").read_bytes()
    assert exported == (root / "a" / "tokenizer" / "tokenizer.model").read_bytes()
    assert tokenizer_lib.SentencePieceTokenizer(exported).sha256 == first


def test_a_run_checkpoint_whose_params_changed_is_passed_over(trained, tmp_path):
    """Cases 3 and 7: a run checkpoint whose parameters no longer match the checksums
    taken at save is damaged: the run resumes from the previous one, saying so."""
    from cpt_jax.train.setup import prepare_run
    from cpt_jax.core.state import abstract_train_state

    root, c = trained
    shutil.copytree(root / "a" / "checkpoints", tmp_path / "checkpoints")
    f = tmp_path / "checkpoints" / "6" / "sums" / "metadata"
    sums = json.loads(f.read_text())
    name = sorted(sums)[0]
    sums[name][0] = (sums[name][0] + 1) % 2**32  # one bit's worth of difference
    f.write_text(json.dumps(sums))
    ckpt = checkpoint_lib.RunCheckpointer(tmp_path / "checkpoints", read_only=True)
    parts = prepare_run(c, str(root / "a"))
    abstract = abstract_train_state(parts.mcfg, parts.tx, parts.shardings)
    step, _, damaged = checkpoint_lib.newest_readable(ckpt.step_dirs(),
                                                      lambda s: ckpt.restore(s, abstract))
    assert step == 4 and [d for d, _ in damaged] == [6]
    assert f"params {name} differ from the checksums" in str(damaged[0][1])
    assert ckpt.restore(6 - 2, abstract)[1]["global_step"] == 4  # the intact one is read


def test_init_checkpoint_with_another_method_set_says_how_to_start(trained, tmp_path):
    """A replay run's checkpoint into replay+ewc used to fail with "fisher ... is missing"."""
    from cpt_jax.train.setup import prepare_run, run_start

    root, c = trained
    c = _tiny(root)
    c.method.name = "replay+ewc"
    c.init.checkpoint = str(root / "a")
    with pytest.raises(ValueError, match=r"made by method.name='replay' and this run uses "
                                         r"'replay\+ewc'.*init.orbax"):
        run_start(c, prepare_run(c, str(tmp_path / "b")), None, None)


def test_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path, capsys):
    """Case 2: the live run's lock; the refused run writes nothing and gives no advice to
    delete the checkpoints the live run is writing."""
    work = tmp_path / "w"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    config = tmp_path / "c.py"
    config.write_text("from test_train_loop import _config\n"
                      f"def get_config():\n    return _config(__import__('pathlib').Path({str(tmp_path)!r}))\n")
    sys.path.insert(0, str(HERE))
    with WorkdirLock(str(work)):
        code = cli.run_main(train_script.main, ["--config", str(config), "--workdir", str(work)])
    err = capsys.readouterr().err
    line = _one_line(err)
    assert code == 2 and f"pid {os.getpid()}" in line and "in use by another" in line, line
    assert "delete" not in line
    assert sorted(os.listdir(work)) == ["keep.txt"]  # released: the lock file is gone


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket

    (work / LOCK_FILE).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    with WorkdirLock(str(work)):
        assert json.loads((work / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"left by process {dead}, which is gone" in capsys.readouterr().err
    assert not (work / LOCK_FILE).exists()


def test_non_finite_pretrained_weights_are_named(tmp_path, capsys):
    """Case 3: one NaN weight in init.hf used to give an all-NaN loss matrix, exit 0."""
    ckpt = tmp_path / "nan"
    shutil.copytree(FIXTURES / "gqa", ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    import ml_collections

    from cpt_jax.train.setup import initial_params

    c = ml_collections.ConfigDict({"init": {"hf": str(ckpt), "orbax": ""}})
    mcfg = load_hf_llama(FIXTURES / "gqa")[0]
    with pytest.raises(ValueError, match=r"init.hf=.*tensor layers/mlp/down/kernel \(layer 1\) "
                                         r"holds 1 non-finite"):
        initial_params(c, mcfg)


def test_params_checkpoint_digests_catch_changed_bytes(tmp_path):
    """Cases 3 and 7: a params checkpoint whose arrays no longer match what was saved is
    refused by name (here the bytes of one tensor changed under an intact meta file)."""
    config, params = load_hf_llama(FIXTURES / "gqa")
    checkpoint_lib.save_params(tmp_path / "p", config, params)
    meta = (tmp_path / "p" / checkpoint_lib.META_FILE).read_text()
    assert checkpoint_lib.load_params(tmp_path / "p")[0] == config  # intact: loads
    flipped = jax.tree.map(np.copy, params)
    flipped["layers"]["attn"]["o"]["kernel"].view(np.uint32)[0, 0, 0, 0] ^= 1 << 22
    checkpoint_lib.save_params(tmp_path / "p", config, flipped, overwrite=True)
    (tmp_path / "p" / checkpoint_lib.META_FILE).write_text(meta)
    with pytest.raises(checkpoint_lib.CheckpointError, match=r"tensor layers/attn/o/kernel "
                                                             r"does not match the digest"):
        checkpoint_lib.load_params(tmp_path / "p")


def test_index_entries_outside_the_model_folder_are_refused(tmp_path):
    """Case 8: model.safetensors.index.json pointing at ../outside.safetensors."""
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "sharded", d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    shutil.move(d / shard, tmp_path / "outside.safetensors")
    index["weight_map"] = {k: ("../outside.safetensors" if v == shard else v)
                           for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"outside the model folder"):
        load_hf_llama(d)


def test_lm_eval_task_names_cannot_inject_yaml(tmp_path):
    """Case 9: a task file name with a newline would write its own YAML key."""
    from cpt_jax.eval import downstream, lm_eval_task

    bad = tmp_path / "x\nprocess_docs: !function utils.pwn.jsonl"
    bad.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "label": 0}) + "\n")
    with pytest.raises(downstream.TaskError, match=r"not a plain task name"):
        lm_eval_task.write_lm_eval_task(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_evaluate_refuses_a_tokenizer_the_model_was_not_trained_with(tmp_path, capsys):
    """Case 6: scores with an unrelated tokenizer used to be printed."""
    texts = [{"kind": "demo", "demo": "python_docs", "max_chars": 20_000}]
    ours = tokenizer_lib.train_tokenizer(texts, str(tmp_path / "a"), 400, sample_chars=20_000)
    other = tokenizer_lib.train_tokenizer(texts, str(tmp_path / "b"), 400, sample_chars=9_000)
    assert ours.sha256 != other.sha256
    config, params = load_hf_llama(FIXTURES / "gqa")
    import dataclasses

    config = dataclasses.replace(config, vocab_size=400)
    params["embed"]["embedding"] = np.zeros((400, config.d_model), np.float32)
    params["lm_head"]["kernel"] = np.zeros((config.d_model, 400), np.float32)
    checkpoint_lib.save_params(tmp_path / "ckpt", config, params, tokenizer_sha256=ours.sha256)
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "label": 0}) + "\n")
    code = evaluate_script.main(["--ckpt", str(tmp_path / "ckpt"), "--tasks", str(task),
                                 "--tokenizer", other.path])
    err = capsys.readouterr().err
    assert code == 2 and "is not the one params checkpoint" in err, err
    assert ours.sha256[:12] in err and other.sha256[:12] in err
    assert evaluate_script.main(["--ckpt", str(tmp_path / "ckpt"), "--tasks", str(task),
                                 "--tokenizer", ours.path]) == 0


def test_overwrite_never_replaces_a_users_file(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code = convert_script.main(["hf-to-orbax", "--hf", str(FIXTURES / "gqa"), "--out",
                                str(target), "--overwrite"])
    assert code == 2 and "not a params checkpoint" in capsys.readouterr().err
    assert target.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_one_line_errors_for_damaged_checkpoint_files(tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama3_scaling", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)  # the transformers v4 layout, without low_freq_factor
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 16}
    (d / "config.json").write_text(json.dumps(cfg))
    assert convert_script.main(["hf-to-orbax", "--hf", str(d), "--out", str(tmp_path / "o")]) == 2
    assert "lacks ['low_freq_factor']" in capsys.readouterr().err
    shutil.rmtree(d)
    shutil.copytree(FIXTURES / "gqa", d)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert convert_script.main(["hf-to-orbax", "--hf", str(d), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "tensor model.layers.0.mlp.up_proj.weight is missing" in err and "'" not in err[:30]
    (d / "config.json").write_text("{broken")
    assert convert_script.main(["hf-to-orbax", "--hf", str(d), "--out", str(tmp_path / "o")]) == 2
    assert f"{d / 'config.json'} is not valid JSON" in capsys.readouterr().err
    config, params = load_hf_llama(FIXTURES / "gqa")
    checkpoint_lib.save_params(tmp_path / "p", config, params)
    (tmp_path / "p" / checkpoint_lib.CONFIG_FILE).write_text("{")
    with pytest.raises(checkpoint_lib.CheckpointError, match=r"model_config.json is not a valid"):
        checkpoint_lib.load_params(tmp_path / "p")


def test_config_file_with_a_syntax_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    code = cli.run_main(train_script.main, ["--config", str(bad), "--workdir",
                                            str(tmp_path / "w")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "bad.py" in line and "line 1" in line, line


def test_ctrl_c_saves_like_sigterm(tmp_path):
    """Case: Ctrl-C used to save nothing and print a KeyboardInterrupt traceback."""
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, str(HERE / "run_worker.py"), str(tmp_path),
                           str(tmp_path / "w"), "--config", "loop", "--signal", "SIGINT",
                           "--at", "5"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "interrupted: saving a checkpoint" in proc.stderr
    assert "preempted: stopped, and the newest checkpoint is step 5" in proc.stderr
    assert checkpoint_lib.RunCheckpointer(tmp_path / "w" / "checkpoints").latest_step() == 5


def test_safetensors_written_here_are_checked_on_load(tmp_path):
    """Case 7: a flipped bit in the data of an exported safetensors file."""
    config, params = load_hf_llama(FIXTURES / "gqa")
    from cpt_jax.hf import save_hf_llama

    out = save_hf_llama(config, params, tmp_path / "hf")
    assert load_hf_llama(out)[0] == config
    path = out / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x04  # inside the last tensor's bytes (the header comes first)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor \S+ does not match the sha256"):
        load_hf_llama(out)


def test_damaged_corpus_files_are_named(tmp_path):
    """A truncated .jsonl.gz (EOFError) and a lone surrogate escape ("Unable to cast Python
    instance" in the tokenizer) used to end in tracebacks that named no file."""
    import gzip

    from cpt_jax.data import sources

    cut = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress(b'{"text": "hello world"}\n' * 2000)
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(sources.DomainError, match=r"cut.jsonl.gz cannot be read to its end"):
        list(sources.iter_documents({"name": "g", "kind": "jsonl", "pattern": str(cut)}))
    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"text": "fine"}\n{"text": "half \\ud800 pair"}\n')
    spec = {"name": "s", "kind": "jsonl", "pattern": str(lone)}
    with pytest.raises(sources.DomainError, match=r"lone.jsonl:2 holds a lone surrogate"):
        list(sources.iter_documents(spec))
    assert list(sources.iter_documents({**spec, "encoding_errors": "replace"})) == [
        "fine", "half \ufffd pair"]


def test_a_truncated_results_json_is_named(tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    (work / "results.json").write_text('{"domains": ["en"], "config": {')
    c = _tiny(tmp_path)
    with pytest.raises(ValueError, match=r"results.json is not a valid results.json"):
        run(c, str(work))
    assert sorted(os.listdir(work)) == ["results.json"]


def test_a_full_disk_during_preparation_is_one_line_and_keeps_what_was_done(tmp_path):
    """A write that fails for lack of room (here a real one: the child's file size limit,
    ``ulimit -f``, makes the kernel refuse the write with EFBIG, as a full disk does with
    ENOSPC) used to end in array_record's RuntimeError traceback. Now: one line naming
    the domain and the cause, the domain prepared before it kept, nothing half-written."""
    import textwrap

    from tiny_runs import demo_tokenizer, tiny_run_config

    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    for name, n_docs in (("en", 3), ("num", 3000)):  # prepared rows: 256 KiB, 7.6 MiB
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for d in range(n_docs):
                text = " ".join(words[(d * 3 + i) % 8] + str(i % 7) for i in range(60))
                f.write(json.dumps({"text": text}) + "\n")
    tok = demo_tokenizer(tmp_path, 400)
    domains = [{"name": n, "kind": "jsonl", "pattern": str(tmp_path / f"{n}.jsonl")}
               for n in ("en", "num")]
    cache = tmp_path / "cache"
    text = tiny_run_config(json.dumps(domains), str(cache), vocab_size=400, steps=2, keep=1)
    (tmp_path / "cfg.py").write_text(text.replace(
        "    return c\n", f"    c.tokenizer.path = {tok.path!r}\n    c.data.workers = 1\n"
                         "    return c\n"))
    child = textwrap.dedent(f"""
        import resource, runpy, signal, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        sys.argv = ["prepare_data.py", "--config", {str(tmp_path / "cfg.py")!r},
                    "--no_progress"]
        runpy.run_path({str(HERE.parent / "scripts" / "prepare_data.py")!r},
                       run_name="__main__")
        """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = _one_line(proc.stderr)
    assert "Domain 'num'" in line and "size limit" in line and "File too large" in line
    names = os.listdir(cache)
    assert not [n for n in names if n.startswith((".tmp-", ".parts-"))], names
    (en,) = [n for n in names if n.startswith("en-")]
    assert (cache / en / "meta.json").is_file()  # the domain before it: complete, kept
    assert not [n for n in names if n.startswith("num-")]

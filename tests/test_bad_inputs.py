"""Bad inputs and faults through scripts/train.py: each gives one line naming the input
and the fix, exit status 2 (1 for a diverged run), and leaves what was written before as
it was; the silent wrong results of the past (loss 0.000 for a domain without validation
rows, resuming onto changed data, replay without an earlier task, finite divergence) are
errors or warnings, and a damaged checkpoint is passed over for the previous one.

The script's ``main`` is called in-process (the same code path as the command line,
without a new interpreter per case); one small completed run is shared by the cases that
need a workdir, each on its own copy.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from cpt_jax import cli
from tiny_runs import load_script, tiny_run_config

train_script = load_script("train")


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A config file over two tiny domains, and one completed run of it (checkpoints at
    steps 2, 4, 6, 8)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    words = {"en": ("the cat sat on a mat while every small dog ran over green hills and "
                    "quiet rivers toward distant houses where people cooked bread, played "
                    "music, wrote letters, painted walls and talked about weather").split(),
             "num": ("zero one two three four five six seven eight nine plus minus times "
                     "equals half double").split() + [str(i) for i in range(100)]}
    domains = []
    for name, vocab in words.items():
        (root / name).mkdir()
        _write_jsonl(root / name / "part0.jsonl",
                     [" ".join(vocab[(d * 7 + i * i * 3 + i) % len(vocab)] for i in range(40))
                      for d in range(60)])
        domains.append({"name": name, "kind": "jsonl", "pattern": str(root / name / "*.jsonl"),
                        "field": "text"})
    config = root / "cfg.py"
    config.write_text(tiny_run_config(json.dumps(domains), str(root / "cache"),
                                      vocab_size=320, steps=4, keep=10))
    base = root / "base"
    code = cli.run_main(train_script.main, ["--config", str(config), "--workdir", str(base)])
    assert code == 0
    return {"root": root, "config": str(config), "base": base, "domains": domains,
            "results": json.loads((base / "results.json").read_text())}


_capsys = None


@pytest.fixture(autouse=True)
def _capture(capsys):
    global _capsys
    _capsys = capsys
    yield


def _train(argv):
    """Run scripts/train.py's main on argv -> (exit status, stdout, stderr)."""
    if _capsys is not None:
        _capsys.readouterr()
    code = cli.run_main(train_script.main, [str(a) for a in argv])
    out, err = _capsys.readouterr() if _capsys is not None else ("", "")
    return code, out, err


def _tree_hash(path) -> str:
    """sha256 over every file's relative path and bytes under path ('' if absent)."""
    if not os.path.exists(path):
        return ""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(path)):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    return lines[0]


def _copy_base(setup, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(setup["base"], work)
    return work


# Config errors: caught before any work, so no workdir is even created.
CONFIG_CASES = [
    ("unknown key", ["--config.replay.rat=0.5"], ["replay.rat", "did you mean replay.rate"]),
    ("bad integer", ["--config.seq_len=abc"], ["--config.seq_len", "integer"]),
    ("bad boolean", ["--config.joint=maybe"], ["--config.joint", "true or false"]),
    ("zero steps", ['--config.tasks=[{"domain": "en", "steps": 0}]'], ["budget", "positive"]),
    ("task of an unknown domain", ['--config.tasks=[{"domain": "fr", "steps": 2}]'],
     ["'fr'", "data.domains"]),
    ("tasks not JSON", ["--config.tasks=[{domain: en}]"], ["--config.tasks", "JSON"]),
    ("tasks not a list", ['--config.tasks={"domain": "en"}'], ["--config.tasks", "list"]),
    ("batch vs microbatches", ["--config.microbatches=3"], ["global_batch=8", "microbatches=3"]),
    ("batch vs batch shards", ["--config.microbatches=2"], ["batch shards", "multiple of"]),
    ("mesh larger than the devices", ["--config.mesh.data=16"], ["mesh", "devices"]),
    ("heads do not divide d_model", ["--config.model.n_heads=5", "--config.model.n_kv_heads=5"],
     ["config.model", "n_heads=5"]),
    ("kv heads do not divide heads", ["--config.model.n_kv_heads=3"], ["n_kv_heads=3"]),
    ("replay schedule", ["--config.replay.schedule=cosine"], ["replay.schedule", "linear_decay"]),
    ("replay rate above 1", ["--config.replay.rate=1.5"], ["replay.rate=1.5", "[0, 1]"]),
    ("negative learning rate", ["--config.optim.lr=-1"], ["optim.lr=-1"]),
    ("lr schedule", ["--config.optim.schedule=linear"], ["optim.schedule", "cosine"]),
    ("no validation fraction", ["--config.data.val_fraction=0"], ["data.val_fraction=0", "validation"]),
    ("no eval rows", ["--config.eval.max_rows=0"], ["eval.max_rows=0"]),
    ("missing tokenizer", ["--config.tokenizer.path=/nonexistent/sp.model"],
     ["tokenizer.path", "/nonexistent/sp.model"]),
    ("missing init.hf", ["--config.init.hf=/nonexistent/llama"], ["init.hf", "/nonexistent/llama"]),
    ("bad reptile entry", ["--config.method.name=replay+reptile",
                           '--config.method.reptile.periods=[{"every": 0, "meta_lr": 0.5}]'],
     ["method.reptile.periods", "every"]),
    ("unknown method", ["--config.method.name=replay+ewcc"], ["method.name", "ewcc"]),
    ("method configured but not selected", ["--config.method.ewc.lam=10"],
     ["method.ewc", "does not select it", "+ewc"]),
    ("method selected without strength", ["--config.method.name=replay+l2"],
     ["l2", "set its strength"]),
    ("domain of an unknown kind", ['--config.data.domains=[{"name": "en", "kind": "csv"}]'],
     ["'en'", "kind"]),
    ("sequence longer than the model", ["--config.seq_len=128"], ["seq_len=128", "max_seq_len"]),
    ("mixture weight not positive", ['--config.tasks=[{"domains": {"en": 1, "num": 0}, '
                                     '"steps": 2}]'], ["domains", "positive weight"]),
    ("mixture of an unknown domain", ['--config.tasks=[{"domains": {"en": 1, "fr": 1}, '
                                      '"steps": 2}]'], ["'fr'", "data.domains"]),
    ("domain and domains", ['--config.tasks=[{"domain": "en", "domains": {"num": 1}, '
                            '"steps": 2}]'], ["exactly one of domain and domains"]),
    ("replay source that a task trains", ['--config.replay.sources=["en"]'],
     ["replay.sources", "'en'", "trained by a task"]),
    ("replay source of an unknown domain", ['--config.replay.sources=["fr"]'],
     ["replay.sources", "'fr'", "data.domains"]),
    ("value without =", ["--config.seed"], ["--config.seed", "VALUE"]),
]


@pytest.mark.parametrize("name,args,needles", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_errors_are_one_line_before_any_work(setup, tmp_path, name, args, needles):
    work = tmp_path / "work"
    code, _, err = _train(["--config", setup["config"], "--workdir", work, *args])
    line = _error_line(err)
    assert code == 2
    for needle in needles:
        assert needle in line, line
    assert not work.exists()  # nothing prepared, trained or written


def test_missing_config_file(tmp_path):
    code, _, err = _train(["--config", tmp_path / "nope.py", "--workdir", tmp_path / "w"])
    assert code == 2 and "nope.py" in _error_line(err)


def test_debug_shows_the_traceback(setup, tmp_path):
    with pytest.raises(ValueError, match="did you mean replay.rate"):
        _train(["--config", setup["config"], "--workdir", tmp_path / "w",
                "--config.replay.rat=0.5", "--debug"])


def test_dict_overrides_are_applied():
    """JSON for a dict-valued key (a FieldReference typed dict) and for a whole sub-config."""
    from cpt_jax.run_config import default_config

    c = default_config()
    cli.apply_override(c, "model.rope_scaling", '{"factor": 8.0}')
    assert c.model.rope_scaling == {"factor": 8.0}
    cli.apply_override(c, "eval", '{"every": 5, "max_rows": 8, "batch": 4}')
    assert (c.eval.every, c.eval.max_rows, c.eval.batch) == (5, 8, 4)
    with pytest.raises(ValueError, match="expected a list"):
        cli.apply_override(c, "tasks", '{"domain": "en"}')


def test_list_override_is_applied(setup, tmp_path):
    """A JSON list on the command line replaces the task list (one task of 2 steps)."""
    code, _, err = _train(["--config", setup["config"], "--workdir", tmp_path / "w",
                           '--config.tasks=[{"domain": "num", "steps": 2}]'])
    assert code == 0, err
    res = json.loads((tmp_path / "w" / "results.json").read_text())
    assert res["tasks"] == ["num"] and res["task_stats"][0]["steps"] == 2


# Data errors.

def test_single_document_domain_gets_validation_rows_from_its_tail(setup, tmp_path):
    """Item 1: a domain of one document had no validation rows (its loss was reported as
    0.000) or no training rows, depending on its hash. Its tail is now held out: the loss
    matrix has a real loss for it, and the text it was trained on stops where its
    validation text starts."""
    one = tmp_path / "one.jsonl"
    words = "the cat sat on a single long mat while dogs ran over hills".split()
    _write_jsonl(one, [" ".join(words[(i * i) % len(words)] for i in range(3000))])
    domains = [setup["domains"][0], {"name": "book", "kind": "jsonl", "pattern": str(one),
                                     "field": "text"}]
    work = tmp_path / "w"
    code, _, err = _train(["--config", setup["config"], "--workdir", work,
                           f"--config.data.domains={json.dumps(domains)}",
                           '--config.tasks=[{"domain": "en", "steps": 2}, '
                           '{"domain": "book", "steps": 2}]'])
    assert code == 0, err[-2000:]
    res = json.loads((work / "results.json").read_text())
    book = [row[1] for row in res["loss_matrix"]]
    assert all(np.isfinite(book)) and min(book) > 0.5
    meta = json.loads(next((setup["root"] / "cache").glob("book-*/meta.json")).read_text())
    assert meta["tail_split"] and meta["n_documents"] == 1
    train, val = meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"]
    # BOS + head | tail + EOS: the tail is val_fraction (0.2) of the document's tokens
    assert (val - 1) == int((train - 1 + val - 1) * 0.2)


def test_domain_without_files(setup, tmp_path):
    domains = [setup["domains"][0], {"name": "num", "kind": "jsonl",
                                     "pattern": str(tmp_path / "missing*.jsonl")}]
    code, _, err = _train(["--config", setup["config"], "--workdir", tmp_path / "w",
                           f"--config.data.domains={json.dumps(domains)}"])
    line = _error_line(err)
    assert code == 2 and "'num'" in line and "missing*.jsonl" in line


def test_parquet_through_text_glob_is_refused_naming_parquet(setup, tmp_path):
    """The UTF-8 error's advice (encoding_errors=replace) once let a run train on a
    Parquet file's bytes with exit 0."""
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    pq.write_table(pa.table({"text": ["one two three"] * 50}), tmp_path / "num.parquet")
    domains = [setup["domains"][0], {"name": "num", "kind": "text_glob",
                                     "pattern": str(tmp_path / "num.parquet"),
                                     "encoding_errors": "replace"}]
    code, _, err = _train(["--config", setup["config"], "--workdir", tmp_path / "w",
                           f"--config.data.domains={json.dumps(domains)}"])
    line = _error_line(err)
    assert code == 2 and "num.parquet is a Parquet file" in line and "'parquet'" in line


def test_tokenizer_vocab_too_small(setup, tmp_path):
    code, _, err = _train(["--config", setup["config"], "--workdir", tmp_path / "w",
                           "--config.model.vocab_size=200"])
    line = _error_line(err)
    assert code == 2 and "vocab_size=200" in line


def test_tokenizer_vocab_too_large_for_the_text(setup, tmp_path):
    """Item 9: one explanation (the sample has too few distinct pieces), not SentencePiece's
    'raise vocab_size' followed by 'lower vocab_size'."""
    code, _, err = _train(["--config", setup["config"], "--workdir", tmp_path / "w",
                           "--config.model.vocab_size=5000"])
    line = _error_line(err)
    assert code == 2 and "vocab_size=5000" in line
    assert "Lower model.vocab_size to at most" in line and "raise" not in line.lower()


# Resuming.

def test_resume_onto_changed_data_is_refused(setup, tmp_path):
    """Item 2: a file added to a domain's folder after the run started (same config, same
    pattern) is not silently trained on with a retrained tokenizer."""
    work = _copy_base(setup, tmp_path)
    extra = setup["root"] / "en" / "part1.jsonl"
    before = _tree_hash(work)
    _write_jsonl(extra, ["more text for the cat"] * 5)
    try:
        code, _, err = _train(["--config", setup["config"], "--workdir", work])
    finally:
        os.remove(extra)
    line = _error_line(err)
    assert code == 2 and "domain en" in line and "--allow_config_change" in line
    assert _tree_hash(work) == before


def test_resume_with_a_modified_file_is_refused(setup, tmp_path):
    """A domain file rewritten in place (same name, other content) is refused too."""
    work = _copy_base(setup, tmp_path)
    path = setup["root"] / "num" / "part0.jsonl"
    original, stat = path.read_bytes(), os.stat(path)
    before = _tree_hash(work)
    path.write_bytes(original + (json.dumps({"text": "9 9 9"}) + "\n").encode())
    try:
        code, _, err = _train(["--config", setup["config"], "--workdir", work])
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    line = _error_line(err)
    assert code == 2 and "domain num" in line
    assert _tree_hash(work) == before


def test_resume_with_another_config_is_refused(setup, tmp_path):
    work = _copy_base(setup, tmp_path)
    before = _tree_hash(work)
    code, _, err = _train(["--config", setup["config"], "--workdir", work,
                           "--config.optim.lr=0.01"])
    line = _error_line(err)
    assert code == 2 and "optim.lr" in line and "new --workdir" in line
    assert _tree_hash(work) == before


def test_config_change_past_the_new_task_list(setup, tmp_path):
    """Item 9: a workdir whose progress is beyond the shortened task list (an IndexError
    before) says to use a new workdir."""
    work = _copy_base(setup, tmp_path)
    before = _tree_hash(work)
    code, _, err = _train(["--config", setup["config"], "--workdir", work,
                           '--config.tasks=[{"domain": "en", "steps": 4}]',
                           "--allow_config_change"])
    line = _error_line(err)
    assert code == 2 and "new --workdir" in line and "task list" in line
    assert _tree_hash(work) == before


def test_workdir_that_is_a_file(setup, tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    code, _, err = _train(["--config", setup["config"], "--workdir", target])
    line = _error_line(err)
    assert code == 2 and str(target) in line
    assert target.read_text() == "keep me"


def _latest_step_dir(work) -> str:
    ckpts = work / "checkpoints"
    return str(ckpts / str(max(int(d) for d in os.listdir(ckpts) if d.isdigit())))


@pytest.mark.parametrize("damage", ["truncated array files", "emptied metadata"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(setup, tmp_path, damage):
    """Item 7: the newest checkpoint is unreadable; the run resumes from the one before
    (with a warning naming the damaged step, which is moved aside, not deleted) and ends
    with exactly the uninterrupted run's results."""
    work = _copy_base(setup, tmp_path)
    latest = _latest_step_dir(work)
    os.remove(work / "results.json")
    if damage == "truncated array files":  # every data file of the state, cut in half
        for d, _, fs in os.walk(os.path.join(latest, "state")):
            for f in fs if os.path.basename(d) == "d" else ():
                with open(os.path.join(d, f), "r+b") as fh:
                    fh.truncate(os.path.getsize(os.path.join(d, f)) // 2)
    else:
        for d, _, fs in os.walk(latest):
            for f in fs:
                if "metadata" in f.lower() or f.endswith(".json"):
                    open(os.path.join(d, f), "w").close()
    code, _, err = _train(["--config", setup["config"], "--workdir", work])
    assert code == 0, err[-3000:]
    step = os.path.basename(latest)
    assert f"checkpoint {latest} is damaged" in err
    assert (work / "checkpoints_damaged" / step).is_dir()
    res = json.loads((work / "results.json").read_text())
    np.testing.assert_array_equal(res["loss_matrix"], setup["results"]["loss_matrix"])


def test_every_checkpoint_damaged_names_the_directory(setup, tmp_path):
    work = _copy_base(setup, tmp_path)
    for step in os.listdir(work / "checkpoints"):
        for d, _, fs in os.walk(work / "checkpoints" / step):
            for f in fs:
                open(os.path.join(d, f), "w").close()
    before = _tree_hash(work)
    code, _, err = _train(["--config", setup["config"], "--workdir", work])
    line = _error_line(err)
    assert code == 2 and f"delete {work / 'checkpoints'}" in line
    assert _tree_hash(work) == before


# Runs that used to give silent wrong results.

def test_finite_divergence_is_stopped_before_it_reaches_a_checkpoint(setup, tmp_path):
    """Item 4: lr=1e6 wrecks the weights in one finite step (the NaN guard never fires);
    the old code trained on and checkpointed the wrecked weights. Every such update is
    now skipped, the run stops, and no checkpoint holds wrecked weights."""
    work = tmp_path / "w"
    code, _, err = _train(["--config", setup["config"], "--workdir", work,
                           "--config.optim.lr=1e6", "--config.optim.max_bad_steps=3",
                           "--config.log_every=1", "--config.checkpoint.every=1"])
    line = _error_line(err)
    assert code == 1
    assert "training diverged" in line and "update larger than the weights allow" in line
    assert "no checkpoint was written" in line
    assert not (work / "results.json").exists()
    assert not [d for d in os.listdir(work / "checkpoints") if d.isdigit()]


def test_divergence_names_the_last_healthy_checkpoint(setup, tmp_path):
    """A run that was healthy for its first task and diverges in the second stops naming
    the first task's checkpoint, the newest one, which holds the healthy weights."""
    work = tmp_path / "w"
    args = ["--config", setup["config"], "--workdir", work]
    code, _, err = _train([*args, '--config.tasks=[{"domain": "en", "steps": 4}]'])
    assert code == 0, err
    code, _, err = _train([*args, "--allow_config_change", "--config.optim.lr=1e6",
                           "--config.optim.max_bad_steps=2", "--config.log_every=1"])
    line = _error_line(err)
    assert code == 1 and "last healthy checkpoint is step 4" in line
    steps = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
    assert steps[-1] == 4


def test_replay_without_an_earlier_task_warns(setup, tmp_path):
    """Item 3: replay 0.25 on a one-task run replays nothing; say so, and results.json
    records the replay done (0 tokens) and the report shows rate 0."""
    from cpt_jax.eval.report import run_row

    code, _, err = _train(["--config", setup["config"], "--workdir", tmp_path / "w",
                           "--config.replay.rate=0.25",
                           '--config.tasks=[{"domain": "en", "steps": 2}]'])
    assert code == 0, err
    assert "replay.rate=0.25 has no effect" in err
    res = json.loads((tmp_path / "w" / "results.json").read_text())
    assert res["compute"]["replay_tokens"] == 0
    assert run_row(res, "one-task")["replay_rate"] == 0


def test_guard_skips_a_loss_spike_against_the_recent_median():
    """The spike guard on hand-made losses: with history [1.0] * 8 and factor 3, a loss of
    2.9 is applied and 3.1 is skipped (median 1.0); skipped losses do not enter the
    history, and a reset history (task boundary) lets any loss through."""
    import jax.numpy as jnp
    import optax

    from cpt_jax.optim import transforms as T

    tx = T.guard_steps(optax.sgd(0.1), loss_spike_factor=3.0)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    g = {"w": jnp.ones(3)}
    for _ in range(T.MIN_LOSS_HISTORY):
        _, state = tx.update(g, state, params, loss=jnp.float32(1.0))
    upd, s_ok = tx.update(g, state, params, loss=jnp.float32(2.9))
    assert float(jnp.abs(upd["w"]).max()) > 0 and int(s_ok.bad_in_a_row) == 0
    upd, s_bad = tx.update(g, state, params, loss=jnp.float32(3.1))
    assert float(jnp.abs(upd["w"]).max()) == 0
    assert int(s_bad.bad_in_a_row) == 1 and int(s_bad.last_reason) == T.SKIP_LOSS_SPIKE
    np.testing.assert_array_equal(s_bad.recent_losses, state.recent_losses)
    # fewer than MIN_LOSS_HISTORY known losses: no spike is called
    fresh = T.reset_loss_history(s_bad)
    upd, s_new = tx.update(g, fresh, params, loss=jnp.float32(50.0))
    assert float(jnp.abs(upd["w"]).max()) > 0 and int(s_new.bad_in_a_row) == 0


def test_guard_skips_an_update_out_of_proportion_to_the_weights():
    """max_update_ratio 1: SGD with lr 0.1 on |w| = 2 applies a gradient of norm 10 (update
    1 < 2) and skips one of norm 30 (update 3 > 2)."""
    import jax.numpy as jnp
    import optax

    from cpt_jax.optim import transforms as T

    tx = T.guard_steps(optax.sgd(0.1), max_update_ratio=1.0)
    params = {"w": jnp.array([2.0, 0.0])}
    state = tx.init(params)
    upd, s1 = tx.update({"w": jnp.array([10.0, 0.0])}, state, params)
    np.testing.assert_allclose(upd["w"], [-1.0, 0.0])
    upd, s2 = tx.update({"w": jnp.array([30.0, 0.0])}, state, params)
    np.testing.assert_array_equal(upd["w"], [0.0, 0.0])
    assert int(s2.last_reason) == T.SKIP_UPDATE_NORM and int(s1.bad_in_a_row) == 0


def test_loss_replay_is_not_logged_for_steps_without_replay(setup):
    """A step without replay rows logs no loss_replay (a logged 0.0 read as a real loss)."""
    rows = [json.loads(x) for x in (setup["base"] / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    first_task = [r for r in steps if r.get("task") == "en"]
    assert first_task and all("loss_replay" not in r for r in first_task)


def test_help_mentions_debug(capsys):
    with pytest.raises(SystemExit):
        train_script.parse_args(["--help"])
    assert "--debug" in capsys.readouterr().out


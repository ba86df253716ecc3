"""cpt_jax.results_file, the one owner of results.json: the round trip, the version a run
writes, and one error line naming the file for each way a file can be unusable."""

import json
import os
import types

import pytest

from cpt_jax import results_file
from cpt_jax.eval import report
from cpt_jax.model import LlamaConfig
from cpt_jax.results_file import ResultsError, ResultsMissing
from cpt_jax.train.results import Progress, make_results

RESULTS = {"domains": ["a", "b"], "tasks": ["a", "b"], "loss_matrix": [[2.0, 5.0], [3.0, 1.0]],
           "eval_curve": [{"step": 0, "task": "init", "losses": {"a": 6.0, "b": 7.0}}],
           "config": {"seq_len": 8, "replay": {"rate": 0.25}}}


def _one_line_error(exc_info, file):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    assert str(file) in msg, msg
    return msg


def test_write_then_read_round_trip(tmp_path):
    run = tmp_path / "run"
    written = results_file.write(str(run), RESULTS)
    assert written == results_file.path(str(run)) == str(run / "results.json")
    assert "schema_version" not in RESULTS                     # the caller's dict is untouched
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk == {"schema_version": results_file.SCHEMA_VERSION, **RESULTS}
    assert list(on_disk)[0] == "schema_version"
    assert results_file.read(str(run)) == on_disk               # a run directory
    assert results_file.read(written) == on_disk                # or the file itself
    assert results_file.read_config(str(run)) == RESULTS["config"]
    assert not [f for f in os.listdir(run) if f != "results.json"]   # no temp file left


def test_write_keeps_a_version_the_dict_carries(tmp_path):
    results_file.write(str(tmp_path), {"schema_version": 1, "tasks": []})
    assert json.loads((tmp_path / "results.json").read_text()) == {"schema_version": 1,
                                                                   "tasks": []}


def test_a_file_without_schema_version_reads_as_version_1(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))     # written before the key
    got = results_file.read(str(tmp_path))
    assert got["schema_version"] == 1
    assert {k: v for k, v in got.items() if k != "schema_version"} == RESULTS
    assert report.load_results(str(tmp_path))["loss_matrix"] == RESULTS["loss_matrix"]


def test_make_results_records_the_schema_version():
    mcfg = LlamaConfig(vocab_size=10, d_model=4, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=6)
    config = types.SimpleNamespace(seq_len=8, method=types.SimpleNamespace(name="replay"))
    parts = types.SimpleNamespace(mcfg=mcfg, names=["a"], eval_order=["a"], recipe=None,
                                  task_names=["a"])
    progress = Progress(task=1, loss_matrix=[[2.0]], init_losses={"a": 6.0},
                        eval_curve=[{"step": 0, "task": "init", "losses": {"a": 6.0}},
                                    {"step": 4, "task": "a", "losses": {"a": 2.0}}],
                        task_stats=[{"task": "a", "steps": 4, "new_tokens": 64,
                                     "replay_tokens": 0}])
    res = make_results(config, parts, progress, {"seq_len": 8})
    assert res["schema_version"] == results_file.SCHEMA_VERSION == 1
    assert list(res)[0] == "schema_version"
    assert res["metrics"]["learned_loss"] == 2.0


@pytest.mark.parametrize("case, text, words", [
    ("truncated", '{"domains": ["en"], "config": {', ["not valid JSON", "truncated"]),
    ("not JSON", "{not json", ["not valid JSON"]),
    ("not utf-8", b"\xff\xfe{}", ["not valid JSON"]),
    ("a list", "[1, 2]", ["JSON list, not an object"]),
    ("a string", '"results"', ["JSON str, not an object"]),
    ("newer", json.dumps({"schema_version": 2, "tasks": []}),
     ["schema_version 2", "newer than the 1", "update cpt_jax"]),
    ("not an int", json.dumps({"schema_version": "1"}), ["'1'", "not a positive integer"]),
    ("zero", json.dumps({"schema_version": 0}), ["not a positive integer"]),
])
def test_an_unusable_file_is_one_line_naming_it(tmp_path, case, text, words):
    file = tmp_path / "results.json"
    if isinstance(text, bytes):
        file.write_bytes(text)
    else:
        file.write_text(text)
    with pytest.raises(ResultsError) as e:
        results_file.read(str(tmp_path))
    msg = _one_line_error(e, file)
    assert isinstance(e.value, ValueError) and not isinstance(e.value, ResultsMissing)
    for w in words:
        assert w in msg, (case, msg)
    with pytest.raises(ValueError):        # the report's callers catch ValueError
        report.load_results(str(tmp_path))


def test_a_missing_file_or_directory_is_one_line_naming_it(tmp_path):
    with pytest.raises(ResultsMissing) as e:
        results_file.read(str(tmp_path))
    msg = _one_line_error(e, tmp_path / "results.json")
    assert "scripts/train.py --workdir" in msg and "finished run" in msg
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    with pytest.raises(ResultsMissing) as e:
        results_file.read(str(tmp_path / "nope"))
    assert _one_line_error(e, tmp_path / "nope").startswith("run directory")
    with pytest.raises(ResultsMissing) as e:
        results_file.read(str(tmp_path / "other.json"))
    _one_line_error(e, tmp_path / "other.json")
    (tmp_path / "a_file").write_text("{}")
    with pytest.raises(ResultsMissing) as e:
        results_file.read(str(tmp_path / "a_file"))
    assert "is not a directory" in _one_line_error(e, tmp_path / "a_file")


def test_required_keys_and_a_config_that_is_not_an_object(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"config": [1]}))
    with pytest.raises(ResultsError) as e:
        results_file.read(str(tmp_path), require=("loss_matrix", "config"))
    assert "['loss_matrix']" in _one_line_error(e, tmp_path / "results.json")
    with pytest.raises(ResultsError) as e:
        results_file.read_config(str(tmp_path))
    assert "config is a JSON list" in _one_line_error(e, tmp_path / "results.json")
    (tmp_path / "results.json").write_text(json.dumps({"tasks": []}))
    assert results_file.read_config(str(tmp_path)) == {}


def test_the_tokenizer_lookup_reads_the_run_config_through_the_owner(tmp_path):
    from cpt_jax.data.tokenizer import TokenizerError, find_run_tokenizer

    ckpt = tmp_path / "run" / "final_params"
    ckpt.mkdir(parents=True)
    assert find_run_tokenizer(str(ckpt)) is None                   # no results.json: none
    (tmp_path / "run" / "results.json").write_text(json.dumps(
        {"config": {"tokenizer": {"path": "/models/tok.model"}}}))
    assert find_run_tokenizer(str(ckpt)) == "/models/tok.model"
    (tmp_path / "run" / "results.json").write_text('{"config": {')  # truncated
    with pytest.raises(TokenizerError) as e:
        find_run_tokenizer(str(ckpt))
    assert "not valid JSON" in _one_line_error(e, tmp_path / "run" / "results.json")

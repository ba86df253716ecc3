"""A multiple-choice task file as a local lm-evaluation-harness task, to cross-check the
native scorer (``cpt_jax.eval.downstream``) on a Hugging Face export.

``write_lm_eval_task`` copies the JSON-lines file into a folder and writes beside it a task
YAML that the harness (``lm_eval --include_path DIR --tasks NAME``) loads offline
(``dataset_path: json``) and scores with the native prompt: the context, then each choice
with no delimiter (choices carry their own leading space), zero-shot, label = index.
``read_lm_eval_samples`` reads the per-choice log-likelihoods back from the harness's
``--log_samples`` output, in item order, to compare with ``evaluate.py --out``.
"""

from __future__ import annotations

import glob
import json
import os
import re

from cpt_jax import atomic
from cpt_jax.eval import downstream

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_YAML = """\
# lm-evaluation-harness task for {source}
# (written by scripts/evaluate.py --lm-eval-config; the native scorer's prompt:
# context + choice, no delimiter, zero-shot)
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
num_fewshot: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_lm_eval_task(task_path: str, out_dir: str) -> str:
    """Writes ``out_dir/NAME.jsonl`` (the validated examples) and ``out_dir/NAME.yaml``;
    returns the task name (the file name without ``.jsonl``)."""
    name = downstream.task_name(task_path)
    if not _PLAIN_NAME.fullmatch(name):  # it becomes YAML and a harness task name
        raise downstream.TaskError(
            f"task file {task_path!r}: its name {name!r} is not a plain task name (letters, "
            "digits, '_', '-' and '.'); rename the file, e.g. my_task.jsonl")
    examples = downstream.load_task(task_path)
    data = os.path.abspath(os.path.join(out_dir, name + ".jsonl"))
    atomic.write_text(data, "".join(json.dumps(
        {k: ex[k] for k in ("context", "choices", "label")}, ensure_ascii=False) + "\n"
        for ex in examples))
    atomic.write_text(os.path.join(out_dir, name + ".yaml"), _YAML.format(
        source=json.dumps(os.path.abspath(task_path)), name=name, data=json.dumps(data)))
    return name


def lm_eval_command(hf_dir: str, include_path: str, names, dtype: str = "float32",
                    output_path: str = "lm_eval_out") -> str:
    """The harness command that scores the local tasks ``names`` on the export ``hf_dir``
    with BOS prepended, as training rows start with it, logging per-item samples."""
    return (f"lm_eval --model hf --model_args pretrained={hf_dir},dtype={dtype},"
            f"add_bos_token=True --include_path {include_path} --tasks {','.join(names)} "
            f"--batch_size 8 --log_samples --output_path {output_path}")


def read_lm_eval_samples(output_path: str, name: str) -> list[list[float]]:
    """Per item (in ``doc_id`` order), the log-likelihood of each choice, from the newest
    ``samples_NAME_*.jsonl`` under ``output_path`` (the harness's ``--log_samples``)."""
    files = sorted(glob.glob(os.path.join(output_path, "**", f"samples_{name}_*.jsonl"),
                             recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no samples_{name}_*.jsonl under {output_path}; run lm_eval "
                                "with --log_samples --output_path " + output_path)
    with open(files[-1]) as f:
        return sample_logliks([json.loads(line) for line in f if line.strip()])


def sample_logliks(samples) -> list[list[float]]:
    """Per item (in ``doc_id`` order), each choice's log-likelihood from the harness's
    samples (``simple_evaluate(..., log_samples=True)["samples"][name]`` or the logged
    JSON lines): every choice's response is ``[(loglik, is_greedy)]``."""
    rows = sorted(samples, key=lambda r: int(r["doc_id"]))
    return [[float(resp[0][0]) for resp in row["resps"]] for row in rows]

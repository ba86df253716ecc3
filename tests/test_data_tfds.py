"""TFDS domains: a tiny local dataset in array_record format (no TensorFlow, no network)."""

import json
import shutil

import numpy as np
import pytest

from cpt_jax.data import prepare, sources
from cpt_jax.data import tokenizer as tk

tfds = pytest.importorskip("tensorflow_datasets")

SEQ_LEN = 16


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    domains = [{"kind": "demo", "demo": "python_docs", "max_chars": 20_000}]
    return tk.train_tokenizer(domains, str(tmp_path_factory.mktemp("tok") / "t"), 400,
                              sample_chars=20_000)


TFDS_DOCS = [f"tfds document {i}: " + "words " * (i % 7) for i in range(12)]


class CptJaxTinyText(tfds.core.GeneratorBasedBuilder):
    """A tiny local text dataset, written as array_record without TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "id": np.int32}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, text in enumerate(TFDS_DOCS):
            yield i, {"text": text, "id": i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    CptJaxTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_domain_end_to_end(tok, tfds_dir, tmp_path):
    domain = {"kind": "tfds", "tfds_name": "cpt_jax_tiny_text", "split": "train",
              "feature": "text", "data_dir": tfds_dir}
    spec = sources.validate_domain(domain)
    assert spec["name"] == "cpt_jax_tiny_text"
    assert sorted(sources.iter_documents(domain)) == sorted(TFDS_DOCS)
    out = prepare.prepare_domains([domain], tok, str(tmp_path / "data"), SEQ_LEN,
                                  val_fraction=0.25, progress=False)
    rows = out["cpt_jax_tiny_text"]
    total = sum(rows[s].meta["splits"][s]["docs"] for s in ("train", "val"))
    assert total == len(TFDS_DOCS) and len(rows["val"]) >= 1
    tokens, segs = rows["train"].read(np.arange(len(rows["train"])))
    text = tok.decode(tokens[segs > 0].tolist())
    assert "tfds document" in text


def test_tfds_errors(tfds_dir, tmp_path):
    with pytest.raises(sources.DomainError, match=r"no split 'validation'.*\['train'\]"):
        list(sources.iter_documents({"kind": "tfds", "tfds_name": "cpt_jax_tiny_text",
                                     "split": "validation", "data_dir": tfds_dir}))
    with pytest.raises(sources.DomainError, match=r"no feature 'body'.*\['id', 'text'\]"):
        list(sources.iter_documents({"kind": "tfds", "tfds_name": "cpt_jax_tiny_text",
                                     "feature": "body", "data_dir": tfds_dir}))
    with pytest.raises(sources.DomainError, match=r"'no_such_dataset_xyz' not found"):
        sources.validate_domain({"kind": "tfds", "tfds_name": "no_such_dataset_xyz",
                                 "data_dir": str(tmp_path)})
    with pytest.raises(sources.DomainError, match=r"is not prepared.*array_record"):
        sources.validate_domain({"kind": "tfds", "tfds_name": "cpt_jax_tiny_text",
                                 "data_dir": str(tmp_path / "empty")})
    # A tfrecord-only copy (faked: same files, format flipped in dataset_info.json).
    copy = tmp_path / "tfrecord"
    shutil.copytree(tfds_dir, copy)
    info_path = copy / "cpt_jax_tiny_text" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(sources.DomainError, match=r"stored as tfrecord.*"
                                                  r"pip install cpt_jax\[tensorflow\]"):
        sources.validate_domain({"kind": "tfds", "tfds_name": "cpt_jax_tiny_text",
                                 "data_dir": str(copy)})


def test_tfds_download_prepares_array_record(tmp_path):
    domain = {"name": "tiny", "kind": "tfds", "tfds_name": "cpt_jax_tiny_text",
              "data_dir": str(tmp_path), "download": True}
    assert sorted(sources.iter_documents(domain)) == sorted(TFDS_DOCS)
    assert list(tmp_path.glob("cpt_jax_tiny_text/1.0.0/*.array_record-*"))

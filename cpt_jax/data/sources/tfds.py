"""``tfds``: a TensorFlow Datasets dataset, ``{"kind": "tfds", "tfds_name": "wiki40b/fr",
"split": "train", "feature": "text", "data_dir": None}``.

Read with ``tfds.data_source`` (array_record files, random access, no TensorFlow). A
dataset that was prepared as tfrecord cannot be read that way: install the optional extra
(``pip install cpt_jax[tensorflow]``) and re-prepare it with ``file_format="array_record"``.
``feature`` may name a nested feature with slashes (``"content/text"``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Mapping

from cpt_jax.data.sources.base import DomainError, SourceKind, content


class Tfds(SourceKind):
    name = "tfds"
    required = ("tfds_name",)
    optional = ("split", "feature", "data_dir", "download")
    location = ("data_dir", "download")

    def default_name(self, d):
        return d["tfds_name"].replace("/", "-").replace(":", "-")

    def normalize(self, d):
        d.setdefault("split", "train")
        d.setdefault("feature", "text")
        d.setdefault("data_dir", None)
        d.setdefault("download", False)

    def documents(self, d) -> Iterator[str]:
        return _iter_tfds(d)

    def fingerprint(self, d):
        builder = _tfds_builder(d)
        files = sorted(glob.glob(os.path.join(str(builder.data_path), "*")))
        return {"tfds": builder.info.full_name,
                "files": [(os.path.basename(p), *content(p)) for p in files]}

    def describe(self, d):
        return f"tfds {d['tfds_name']!r} split {d['split']!r}"



def _tfds_builder(d: dict):
    """The prepared, array_record-backed builder of a tfds domain, or a clear error."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    where = f"data_dir={d['data_dir']!r}" if d["data_dir"] else "the default TFDS data_dir"
    try:
        builder = tfds.builder(d["tfds_name"], data_dir=d["data_dir"])
    except tfds.core.registered.DatasetNotFoundError:
        raise DomainError(f"Domain {d['name']!r}: TFDS dataset {d['tfds_name']!r} not "
                          f"found (no registered builder and no prepared data in "
                          f"{where}); check the name and data_dir.") from None
    if not builder.is_prepared():
        if not d["download"]:
            raise DomainError(
                f"Domain {d['name']!r}: TFDS dataset {d['tfds_name']!r} is not prepared in "
                f"{where}. Prepare it in array_record format (e.g. `tfds build "
                f"{d['tfds_name']} --file_format=array_record`) or set \"download\": True.")
        builder.download_and_prepare(file_format="array_record")
    fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if fmt not in ("array_record", "parquet"):
        raise DomainError(
            f"Domain {d['name']!r}: TFDS dataset {d['tfds_name']!r} in {where} is stored as "
            f"{fmt}, which needs TensorFlow to read. Install the optional extra "
            f"(`pip install cpt_jax[tensorflow]`) and re-prepare it with "
            f"file_format=\"array_record\", or point data_dir at an array_record copy.")
    return builder


def _iter_tfds(d: dict, batch: int = 256) -> Iterator[str]:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    builder = _tfds_builder(d)
    if d["split"] not in builder.info.splits:
        raise DomainError(f"Domain {d['name']!r}: TFDS dataset {d['tfds_name']!r} has no "
                          f"split {d['split']!r}; use one of {sorted(builder.info.splits)}.")
    source = tfds.data_source(d["tfds_name"], split=d["split"], data_dir=d["data_dir"],
                              download=False)
    path = d["feature"].split("/")
    for start in range(0, len(source), batch):
        for i, example in enumerate(source.__getitems__(
                range(start, min(start + batch, len(source))))):
            value = example
            for key in path:
                if not isinstance(value, Mapping) or key not in value:
                    keys = sorted(value) if isinstance(value, Mapping) else type(value)
                    raise DomainError(f"Domain {d['name']!r}: example {start + i} of "
                                      f"{d['tfds_name']!r} has no feature {d['feature']!r} "
                                      f"(features: {keys}); set \"feature\".")
                value = value[key]
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace")
            elif hasattr(value, "item"):  # numpy scalar
                value = value.item()
                value = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            if not isinstance(value, str):
                raise DomainError(f"Domain {d['name']!r}: feature {d['feature']!r} of "
                                  f"{d['tfds_name']!r} is not text ({type(value).__name__}).")
            yield value

"""``hf_dataset``: a Hugging Face ``datasets`` dataset on disk, one document per row, the
text in column ``field`` (default ``text``)::

    {"kind": "hf_dataset", "path": "/data/wiki_de"}                    # save_to_disk(Dataset)
    {"kind": "hf_dataset", "path": "/data/wiki", "split": "train"}     # save_to_disk(DatasetDict)
    {"kind": "hf_dataset", "path": "~/.cache/huggingface/datasets/x/*/*.arrow"}  # Arrow files

A ``save_to_disk`` folder holds Arrow IPC stream shards listed in its ``state.json``
(a ``DatasetDict`` holds one such folder per split, listed in ``dataset_dict.json``; it
needs ``split``). They are read with pyarrow directly, record batch by record batch and
memory-mapped, so the ``datasets`` package is not needed to train on them. ``path`` may
also be an Arrow file or a glob of them (stream or file format).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from cpt_jax.data.sources.base import DomainError, SourceKind, glob_files, is_text_type


def _shards(d: dict) -> list[str]:
    """The Arrow files of the domain, in order."""
    path = os.path.expanduser(str(d["path"]))
    if not os.path.isdir(path):
        return glob_files({"name": d["name"], "pattern": [path]})
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        if d["split"] is None or d["split"] not in splits:
            what = "needs" if d["split"] is None else f"has no split {d['split']!r}; set"
            raise DomainError(f"Domain {d['name']!r}: {path} is a DatasetDict and {what} "
                              f"\"split\" to one of {splits}.")
        path = os.path.join(path, d["split"])
    elif d["split"] is not None:
        raise DomainError(f"Domain {d['name']!r}: {path} holds one dataset, not a "
                          f"DatasetDict of splits; remove \"split\": {d['split']!r}.")
    state = os.path.join(path, "state.json")
    if not os.path.isfile(state):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".arrow"))
        if not files:
            raise DomainError(f"Domain {d['name']!r}: {path} is not a datasets.save_to_disk "
                              f"folder (no state.json, no .arrow files); give the folder "
                              f"save_to_disk wrote or a glob of .arrow files.")
        return files
    with open(state) as f:
        listed = [entry["filename"] for entry in json.load(f).get("_data_files", [])]
    return [os.path.join(path, name) for name in listed]


def _batches(path: str):
    """Record batches of an Arrow IPC file, stream or file format, memory-mapped."""
    import pyarrow as pa  # pylint: disable=import-outside-toplevel

    try:
        reader = pa.ipc.open_stream(pa.memory_map(path))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(path))
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    yield from reader


class HfDataset(SourceKind):
    name = "hf_dataset"
    required = ("path",)
    optional = ("split", "field")
    location = ("path",)

    def normalize(self, d):
        d["path"] = str(d["path"])
        d.setdefault("split", None)
        d.setdefault("field", "text")

    def files(self, d):
        return _shards(d)

    def describe(self, d):
        return f"path {d['path']!r}" + (f" split {d['split']!r}" if d["split"] else "")

    def documents(self, d) -> Iterator[str]:
        import pyarrow as pa  # pylint: disable=import-outside-toplevel

        for path in self.files(d):
            try:
                for batch in _batches(path):
                    if d["field"] not in batch.schema.names:
                        raise DomainError(
                            f"Domain {d['name']!r}: {path} has no column {d['field']!r} "
                            f"(columns: {batch.schema.names}); set \"field\".")
                    column = batch.column(d["field"])
                    if not is_text_type(column.type):
                        raise DomainError(f"Domain {d['name']!r}: column {d['field']!r} of "
                                          f"{path} is {column.type}, not text; set \"field\".")
                    for value in column.to_pylist():
                        yield "" if value is None else value
            except (pa.ArrowInvalid, OSError) as e:
                raise DomainError(f"Domain {d['name']!r}: {path} is not a readable Arrow "
                                  f"file ({e}).") from None

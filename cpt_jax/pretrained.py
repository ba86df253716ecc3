"""What a run that starts from trained weights takes from them: the model and the tokenizer.

The checkpoint is the source of truth. With ``init.hf=DIR`` the model is ``DIR/config.json``
(shape, ``rope_theta``, ``rope_scaling``, ``norm_eps``, tied embeddings, ``head_dim``,
maximum positions and embedding rows); with ``init.orbax`` the params checkpoint's
``model_config.json``; with ``init.checkpoint`` the model of the run that wrote it. Each of
those ``config.model`` keys left unset (None) takes the checkpoint's value; one set to a
different value is an error naming the key, raised before anything is prepared. A run
from random weights fills unset keys from ``MODEL_DEFAULTS``.

An empty ``tokenizer.path`` means the checkpoint's own tokenizer: the one in the
``init.hf`` directory, or the copy kept by the run (or the ``hf-to-orbax`` conversion) that
an ``init.orbax`` / ``init.checkpoint`` path comes from. A pretrained start never trains a
new tokenizer: new ids under trained embeddings would be a different model.
"""

from __future__ import annotations

import json
import math
import os

from cpt_jax import hf
from cpt_jax.data import tokenizer as tokenizer_lib
from cpt_jax.model import LlamaConfig
from cpt_jax.train import checkpoint as checkpoint_lib

# config.model keys a checkpoint determines, and their values for a fresh model.
MODEL_DEFAULTS = dict(vocab_size=32000, d_model=512, n_layers=16, n_heads=8, n_kv_heads=8,
                      d_ff=1280, head_dim=None, rope_theta=10000.0, rope_scaling=None,
                      norm_eps=1e-5, tie_embeddings=False, max_seq_len=2048)
INIT_KEYS = ("hf", "orbax", "checkpoint")


def init_source(config) -> tuple[str, str] | None:
    """("init.hf" | "init.orbax" | "init.checkpoint", path) of a pretrained start, or None."""
    given = [key for key in INIT_KEYS if config.init.get(key)]
    if len(given) > 1:
        raise ValueError(f"{' and '.join('init.' + k for k in given)} are all set: start "
                         "from only one of them")
    return (f"init.{given[0]}", os.path.expanduser(config.init[given[0]])) if given else None


def checkpoint_model(key: str, path: str) -> dict:
    """The model fields (``MODEL_DEFAULTS`` keys) of the checkpoint at ``path``."""
    if key == "init.hf":
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise ValueError(f"{key}={path!r} has no config.json; give a Hugging Face model "
                             "directory (config.json plus model.safetensors)")
        try:
            with open(file) as f:
                model = hf.config_from_hf(json.load(f)).to_dict()
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON ({e}); restore it from the "
                             "checkpoint's original files") from None
        except ValueError as e:
            raise ValueError(f"{key}={path}: {e}") from None
    elif key == "init.orbax":
        model = checkpoint_lib.load_config(path).to_dict()
    else:
        model = _run_checkpoint_model(path)
    model["head_dim"] = model.get("head_dim") or (model["d_model"] // model["n_heads"])
    return {k: model[k] for k in MODEL_DEFAULTS}


def _run_checkpoint_model(path: str) -> dict:
    """The ``config.model`` of the run whose checkpoint (workdir, checkpoints/ or one step
    directory) ``path`` is, from the newest readable checkpoint's stored config."""
    path = os.path.abspath(path)
    directory, step = path, None
    if os.path.isdir(os.path.join(path, "checkpoints")):
        directory = os.path.join(path, "checkpoints")
    elif os.path.basename(path).isdigit():
        directory, step = os.path.dirname(path), int(os.path.basename(path))
    source = checkpoint_lib.RunCheckpointer(directory, read_only=True)
    step = source.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"init.checkpoint={path}: no complete checkpoint under "
                                f"{directory}")
    return dict(source.read_json(step, "config")["model"])


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b),
                                                                 rel_tol=1e-9)
    if isinstance(a, dict) or isinstance(b, dict):
        return (a is None) == (b is None) and (a is None or set(a) == set(b) and all(
            _same(a[k], b[k]) for k in a))
    return a == b


def resolve_model(config) -> None:
    """Fill the unset (None) ``MODEL_DEFAULTS`` keys of ``config.model`` in place, from the
    pretrained checkpoint or the defaults; ValueError names a key that contradicts it."""
    source = init_source(config)
    if source is None:
        for k, v in MODEL_DEFAULTS.items():
            if config.model[k] is None and v is not None:
                config.model[k] = v
        return
    key, path = source
    if not os.path.exists(path):
        raise ValueError(f"{key}={path!r} does not exist")
    theirs = checkpoint_model(key, path)
    where = {"init.hf": "its config.json", "init.orbax": "its model_config.json",
             "init.checkpoint": "the run that wrote it"}[key]
    mine = config.model
    for k, v in theirs.items():
        given = mine[k]
        if k == "head_dim" and given is None:
            pass
        elif given is not None and not _same(given, v):
            raise ValueError(
                f"model.{k}={given} contradicts the checkpoint {key}={path} ({k}={v} in "
                f"{where}); remove model.{k} from the config to use the checkpoint's model")
        mine[k] = dict(v) if isinstance(v, dict) else v
    if mine.head_dim == mine.d_model // mine.n_heads and not mine.d_model % mine.n_heads:
        mine.head_dim = None  # the default: d_model // n_heads


def model_config(config):
    """The run's ``LlamaConfig``: ``config.model`` with its unset keys resolved
    (``resolve_model``; idempotent)."""
    resolve_model(config)
    return LlamaConfig.from_dict(config.model.to_dict())


def tokenizer_path(config) -> str | None:
    """Where the run's tokenizer is: ``tokenizer.path``, else the pretrained checkpoint's
    own; None for a fresh model that trains one. ValueError when a pretrained start has
    no tokenizer to take (naming what to give)."""
    if config.tokenizer.path:
        return os.path.expanduser(config.tokenizer.path)
    source = init_source(config)
    if source is None:
        return None
    key, path = source
    if key == "init.hf":
        files = [f for _, f in tokenizer_lib.KINDS.values()]
        if any(os.path.isfile(os.path.join(path, f)) for f in files):
            return path
        raise ValueError(
            f"{key}={path} holds no tokenizer ({' or '.join(files)}) and tokenizer.path is "
            "empty; set tokenizer.path to the tokenizer the checkpoint was trained with (a "
            "pretrained model never gets a newly trained one)")
    found = tokenizer_lib.find_run_tokenizer(path)
    if found is None:
        raise ValueError(
            f"{key}={path}: the run it comes from kept no tokenizer and tokenizer.path is "
            "empty; set tokenizer.path to the tokenizer that model was trained with (a "
            "pretrained model never gets a newly trained one)")
    return found

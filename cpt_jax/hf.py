"""Hugging Face Llama checkpoints <-> cpt_jax parameters, without torch.

``load_hf_llama`` reads a ``LlamaForCausalLM`` directory (``config.json`` plus
``model.safetensors`` or sharded ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``) into a ``LlamaConfig`` and our parameter tree;
``save_hf_llama`` writes the reverse, loadable by ``transformers`` and read back bit-exactly.

Weight layout. torch ``Linear`` stores ``[out, in]``; our kernels are ``[in, out]`` with the
head axes split out, and the layers are stacked on a leading axis (``nn.scan``)::

    model.embed_tokens.weight                [V, D]      -> embed/embedding        [V, D]
    model.layers.{i}.self_attn.q_proj.weight [H*Dh, D]   -> layers/attn/q/kernel   [L, D, H, Dh]
    model.layers.{i}.self_attn.{k,v}_proj    [KV*Dh, D]  -> layers/attn/{k,v}      [L, D, KV, Dh]
    model.layers.{i}.self_attn.o_proj.weight [D, H*Dh]   -> layers/attn/o/kernel   [L, H, Dh, D]
    model.layers.{i}.mlp.{gate,up}_proj      [F, D]      -> layers/mlp/{gate,up}   [L, D, F]
    model.layers.{i}.mlp.down_proj.weight    [D, F]      -> layers/mlp/down        [L, F, D]
    model.layers.{i}.input_layernorm.weight  [D]         -> layers/attn_norm/scale [L, D]
    model.layers.{i}.post_attention_layernorm.weight [D] -> layers/mlp_norm/scale [L, D]
    model.norm.weight                        [D]         -> final_norm/scale       [D]
    lm_head.weight                           [V, D]      -> lm_head/kernel         [D, V]

No q/k permutation is needed: HF checkpoints are already in the rotate-half RoPE layout that
``cpt_jax.model.apply_rope`` uses. Arrays are returned as host numpy arrays; place them on
devices with ``jax.device_put(params, shardings)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from cpt_jax import atomic
from cpt_jax.data.tokenizer import check_vocab, load_tokenizer
from cpt_jax.model import LlamaConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # what transformers calls "5GB"
# safetensors metadata key of a tensor's sha256 in the files save_hf_llama writes
DIGEST_PREFIX = "cpt_jax.sha256."

_NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
# safetensors header dtype names, for the raw-bytes fallback reader.
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}

# Per-layer tensors: HF suffix -> (our path inside a layer, kind). `kind` says how the torch
# [out, in] matrix becomes our kernel; see _to_ours / _to_hf.
_LAYER_MAP = {
    "input_layernorm.weight": (("attn_norm", "scale"), "vector"),
    "self_attn.q_proj.weight": (("attn", "q", "kernel"), "qkv"),
    "self_attn.k_proj.weight": (("attn", "k", "kernel"), "qkv"),
    "self_attn.v_proj.weight": (("attn", "v", "kernel"), "qkv"),
    "self_attn.o_proj.weight": (("attn", "o", "kernel"), "o"),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), "vector"),
    "mlp.gate_proj.weight": (("mlp", "gate", "kernel"), "linear"),
    "mlp.up_proj.weight": (("mlp", "up", "kernel"), "linear"),
    "mlp.down_proj.weight": (("mlp", "down", "kernel"), "linear"),
}
# Tensors some older checkpoints carry that hold no learned weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- config


def config_from_hf(hf: dict, *, param_dtype: str = "float32") -> LlamaConfig:
    """LlamaConfig from a parsed HF ``config.json``; ValueError for anything we cannot run.

    Accepts both the transformers v4 layout (``rope_theta`` + ``rope_scaling``) and the v5
    one (``rope_parameters`` holding both).
    """
    if hf.get("model_type") != "llama":
        raise ValueError(
            f"config.json has model_type={hf.get('model_type')!r}; only 'llama' "
            "(LlamaForCausalLM) checkpoints can be loaded")
    archs = hf.get("architectures")
    if archs is not None and "LlamaForCausalLM" not in archs:
        raise ValueError(
            f"config.json has architectures={archs}; only LlamaForCausalLM can be loaded")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"config.json sets {flag}=true; cpt_jax's Llama has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json has hidden_act={hf['hidden_act']!r}; only 'silu' is supported")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                           "num_attention_heads", "intermediate_size") if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks required field(s) {missing}")

    rope = hf.get("rope_parameters") or {}
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
    if scaling is None and rope.get("rope_type", rope.get("type", "default")) != "default":
        scaling = rope
    rope_scaling = None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            rope_scaling = None
        elif kind == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")
            missing = [k for k in keys if k not in scaling]
            if missing:
                raise ValueError(f"config.json's llama3 rope_scaling lacks {missing}; Llama-3 "
                                 "RoPE scaling needs all of " + ", ".join(keys))
            rope_scaling = {k: (int if k.startswith("original") else float)(scaling[k])
                            for k in keys}
        else:
            raise ValueError(
                f"config.json has RoPE scaling of type {kind!r}; only 'llama3' (or none) is "
                "supported by cpt_jax.model.rope_inv_freq")

    d, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and (d % h != 0 or int(head_dim) != d // h):
        head_dim = int(head_dim)
    else:
        head_dim = None
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=d,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=h,
        n_kv_heads=int(hf.get("num_key_value_heads") or h),
        d_ff=int(hf["intermediate_size"]),
        head_dim=head_dim,
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        init_std=float(hf.get("initializer_range", 0.02)),
        param_dtype=param_dtype,
    )


def config_to_hf(config: LlamaConfig, torch_dtype: str) -> dict:
    """The ``config.json`` dict transformers' LlamaConfig reads (v4 layout; v5 converts it)."""
    c = config
    rope_scaling = None
    if c.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **{k: v for k, v in dict(c.rope_scaling).items()}}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": c.init_std,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }


def hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a HF checkpoint of `config` must hold, with its torch shape."""
    c = config
    d, f, v, dh = c.d_model, c.d_ff, c.vocab_size, c.dim_per_head
    per_layer = {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (c.n_heads * dh, d),
        "self_attn.k_proj.weight": (c.n_kv_heads * dh, d),
        "self_attn.v_proj.weight": (c.n_kv_heads * dh, d),
        "self_attn.o_proj.weight": (d, c.n_heads * dh),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(c.n_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    shapes["model.norm.weight"] = (d,)
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


# ----------------------------------------------------------------------------- reading


def _read_raw(path: Path, name: str) -> np.ndarray:
    """Read one tensor straight from the safetensors bytes (fallback for dtypes the installed
    safetensors' numpy backend cannot return, e.g. BF16 in older releases)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        info = header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        buf = f.read(end - start)
    return np.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


class _TensorReader:
    """Lazy name -> numpy array access across one or several safetensors files."""

    def __init__(self, directory: Path):
        index = directory / INDEX_FILE
        single = directory / SINGLE_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index} is not a valid safetensors index ({e}); copy the "
                                 "checkpoint again") from None
            root = directory.resolve()
            self.files = {}
            for name, fname in weight_map.items():
                path = (directory / str(fname)).resolve()
                if path.parent != root:  # "../x.safetensors", "/abs/x", a symlink out
                    raise ValueError(
                        f"{index} maps tensor {name} to {fname!r}, outside the model folder "
                        f"{directory}; a checkpoint's shards must sit beside its index")
                self.files[name] = path
        elif single.exists():
            with _safe_open(single) as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; point --hf/path at a "
                "directory written by save_pretrained(..., safe_serialization=True)")
        for p in sorted(set(self.files.values())):
            if not p.exists():
                raise FileNotFoundError(f"{INDEX_FILE} in {directory} names missing shard {p.name}")
            with _safe_open(p):  # a damaged shard is named now, not mid-conversion
                pass

    def names(self):
        return self.files.keys()

    def get(self, name: str) -> np.ndarray:
        """The tensor, checked against the sha256 our exports record in the file's metadata
        (a file from elsewhere carries none)."""
        path = self.files[name]
        with _safe_open(path) as f:
            digest = (f.metadata() or {}).get(DIGEST_PREFIX + name)
            try:
                x = f.get_tensor(name)
            except (TypeError, ValueError, RuntimeError):
                x = _read_raw(path, name)
        if digest is not None and _digest(x) != digest:
            raise ValueError(f"{path}: tensor {name} does not match the sha256 recorded when "
                             "it was written (bit rot or a damaged copy); copy it again")
        return x


def _safe_open(path: Path):
    """``safe_open`` whose failure names the file (safetensors' own error does not)."""
    try:
        return safe_open(path, framework="np")
    except SafetensorError as e:
        raise ValueError(
            f"{path} is not a valid safetensors file ({e}); re-download it, or re-save the "
            "model with save_pretrained(..., safe_serialization=True)") from None


def _digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _to_ours(kind: str, w: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """torch-layout tensor -> our kernel layout (see the module docstring)."""
    dh = config.dim_per_head
    if kind == "vector":
        return w
    if kind == "linear":  # [out, in] -> [in, out]
        return w.T
    if kind == "qkv":  # [N*Dh, D] -> [D, N, Dh]
        return w.T.reshape(w.shape[1], w.shape[0] // dh, dh)
    if kind == "o":  # [D, H*Dh] -> [H, Dh, D]
        return w.T.reshape(w.shape[1] // dh, dh, w.shape[0])
    raise AssertionError(kind)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    """Inverse of _to_ours: our kernel -> torch [out, in] layout, C-contiguous."""
    if kind == "vector":
        return np.ascontiguousarray(x)
    if kind == "linear":
        return np.ascontiguousarray(x.T)
    if kind == "qkv":  # [D, N, Dh] -> [N*Dh, D]
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    if kind == "o":  # [H, Dh, D] -> [D, H*Dh]
        return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
    raise AssertionError(kind)


def _set(tree: dict, path: tuple[str, ...], value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def load_hf_llama(path, param_dtype: str | None = "float32"):
    """Load a HF ``LlamaForCausalLM`` directory -> ``(LlamaConfig, params)``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards + index).
      param_dtype: dtype of the returned arrays ("float32", "bfloat16", "float16"); None keeps
        the checkpoint's dtype. Upcasting bf16/f16 to float32 is exact.

    Returns the config (``scan_layers=True``, ``param_dtype`` set accordingly) and a nested
    dict of host numpy arrays with layers stacked on a leading axis.

    Raises ValueError for a non-Llama config, unsupported options, or a tensor whose shape
    disagrees with config.json (naming the tensor, expected and found shapes); KeyError for
    a missing tensor.
    """
    directory = Path(path)
    cfg_file = directory / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found; expected a HF model directory")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e}); copy it again from the "
                         "checkpoint") from None
    reader = _TensorReader(directory)
    if param_dtype is not None and param_dtype not in _NP_DTYPES:
        raise ValueError(f"param_dtype={param_dtype!r}: choose one of {sorted(_NP_DTYPES)} or None")

    config = config_from_hf(hf)
    expected = hf_shapes(config)
    present = set(reader.names())
    for name in expected:
        if name not in present:
            raise ValueError(
                f"tensor {name} is missing from the checkpoint in {directory} "
                f"(config.json implies it; tie_word_embeddings={config.tie_embeddings}); "
                "the download is incomplete or config.json belongs to another model")
    unexpected = sorted(
        n for n in present - set(expected)
        if not n.endswith(_IGNORED_SUFFIXES) and not (n == "lm_head.weight" and config.tie_embeddings))
    if unexpected:
        raise ValueError(
            f"checkpoint in {directory} has tensors a Llama of this config.json does not: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")

    def read(name):
        w = reader.get(name)
        if tuple(w.shape) != expected[name]:
            raise ValueError(
                f"tensor {name} has shape {tuple(w.shape)} but config.json implies "
                f"{expected[name]}; the checkpoint and its config.json disagree")
        return w

    embedding = read("model.embed_tokens.weight")
    out_dtype = _NP_DTYPES[param_dtype] if param_dtype else embedding.dtype
    config = dataclasses.replace(config, param_dtype=out_dtype.name)

    L = config.n_layers
    params: dict = {}
    params["embed"] = {"embedding": embedding.astype(out_dtype)}
    for suffix, (sub, kind) in _LAYER_MAP.items():
        stacked = None
        for i in range(L):
            x = _to_ours(kind, read(f"model.layers.{i}.{suffix}"), config)
            if stacked is None:
                stacked = np.empty((L,) + x.shape, out_dtype)  # [L, ...], filled layer by layer
            stacked[i] = x
        _set(params, ("layers",) + sub, stacked)
    params["final_norm"] = {"scale": read("model.norm.weight").astype(out_dtype)}
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": np.ascontiguousarray(read("lm_head.weight").T, out_dtype)}
    return config, params


# ----------------------------------------------------------------------------- writing


def _layer_tree(params: dict, config: LlamaConfig, i: int) -> dict:
    """Layer i's sub-tree, whether params are stacked (``layers``) or per-layer (``layers_i``)."""
    if "layers" in params:
        return _index_tree(params["layers"], i)
    key = f"layers_{i}"
    if key not in params:
        raise KeyError(f"params have neither 'layers' (stacked) nor '{key}' (per-layer)")
    return params[key]


def _index_tree(tree, i):
    if isinstance(tree, dict):
        return {k: _index_tree(v, i) for k, v in tree.items()}
    return tree[i]


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _hf_tensors(config: LlamaConfig, params, dtype: np.dtype):
    """Yield (hf_name, numpy array in torch layout, cast to dtype), one at a time."""
    params = _host(params)
    yield "model.embed_tokens.weight", np.ascontiguousarray(params["embed"]["embedding"], dtype)
    for i in range(config.n_layers):
        layer = _layer_tree(params, config, i)
        for suffix, (sub, kind) in _LAYER_MAP.items():
            yield f"model.layers.{i}.{suffix}", _to_hf(kind, np.asarray(_get(layer, sub), dtype))
    yield "model.norm.weight", np.ascontiguousarray(params["final_norm"]["scale"], dtype)
    if not config.tie_embeddings:
        yield "lm_head.weight", _to_hf("linear", np.asarray(params["lm_head"]["kernel"], dtype))


def _host(tree):
    """Nested dict of (jax or numpy) arrays -> nested dict of numpy arrays, leaf by leaf."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _host(v) for k, v in tree.items()}
    return np.asarray(tree)


def save_hf_llama(config: LlamaConfig, params, path, dtype: str | None = None, *,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                  tokenizer=None) -> Path:
    """Write ``params`` as a HF ``LlamaForCausalLM`` directory at ``path``.

    Produces ``config.json`` and ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
    shards plus ``model.safetensors.index.json`` when the weights exceed ``max_shard_bytes``.
    ``dtype`` ("float32", "bfloat16", "float16") casts every tensor; None keeps the dtype of
    the embedding table. Params may be stacked (``layers``) or per-layer (``layers_{i}``).

    ``tokenizer`` (the model's tokenizer: a ``cpt_jax.data.tokenizer.Tokenizer``, or the path
    of a .model, a tokenizer.json or a folder holding either) adds the files
    ``AutoTokenizer`` reads (``Tokenizer.save``: a tokenizer.json carried unchanged, or one
    converted from a SentencePiece model that encodes exactly as it), the BOS/EOS/pad ids to
    ``config.json`` and a ``generation_config.json``. Without it the directory holds the
    model alone. Embedding rows beyond the tokenizer's vocabulary (a padded vocabulary)
    are kept.

    The directory is written under a temporary name beside ``path`` and renamed at the end,
    so a failure never leaves a half-written model. An existing non-empty ``path`` is an
    error unless ``overwrite=True``. Arrays must be fully addressable from this process
    (gather a multi-host sharded tree first). Only one shard of converted tensors is held in
    memory at a time.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to "
                              "replace it")
    if dtype is None:
        dtype = np.dtype(params["embed"]["embedding"].dtype).name
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(_NP_DTYPES)}")
    np_dtype = _NP_DTYPES[dtype]
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
    token_ids = None
    if tokenizer is not None:
        tokenizer = _tokenizer(tokenizer, config)
        token_ids = tokenizer.special_ids()
        if len(tokenizer.stop_ids) > 1:
            token_ids["eos_token_id"] = list(tokenizer.stop_ids)

    # Plan the shards from shapes alone (greedy in checkpoint order, as transformers does),
    # so file names can say "-of-N" before any tensor is converted.
    shapes = hf_shapes(config)
    shard_of, n_shards, size = {}, 1, 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        if size and size + nbytes > max_shard_bytes:
            n_shards, size = n_shards + 1, 0
        shard_of[name] = n_shards - 1
        size += nbytes
    fnames = [SINGLE_FILE] if n_shards == 1 else [
        f"model-{j + 1:05d}-of-{n_shards:05d}.safetensors" for j in range(n_shards)]

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        shard, current = {}, 0

        def write(shard, j):  # "format": transformers refuses safetensors files without it
            meta = {"format": "pt", **{DIGEST_PREFIX + n: _digest(a) for n, a in shard.items()}}
            save_file(shard, str(tmp / fnames[j]), metadata=meta)

        for name, arr in _hf_tensors(config, params, np_dtype):
            if arr.shape != shapes[name]:
                raise ValueError(
                    f"params for {name} have shape {arr.shape} (torch layout) but the config "
                    f"implies {shapes[name]}; params and config disagree")
            if shard_of[name] != current:
                write(shard, current)
                shard, current = {}, shard_of[name]
            shard[name] = arr
        write(shard, current)
        if n_shards > 1:
            total = sum(int(np.prod(s)) * np_dtype.itemsize for s in shapes.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {name: fnames[j] for name, j in shard_of.items()}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(
            {**config_to_hf(config, dtype), **(token_ids or {})}, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            (tmp / "generation_config.json").write_text(json.dumps(
                token_ids, indent=2, sort_keys=True) + "\n")
            tokenizer.save(str(tmp), model_max_length=config.max_seq_len)
        _publishable(tmp)
        atomic.replace_dir(str(tmp), str(target))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _tokenizer(tokenizer, config: LlamaConfig):
    """The tokenizer to export (a ``cpt_jax.data.tokenizer.Tokenizer`` or the path of a
    .model, a tokenizer.json or a folder holding either), checked to fit the embedding."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer))
    check_vocab(tokenizer, config.vocab_size)
    return tokenizer


def _publishable(directory: Path):
    """mkdtemp makes a 0700 directory (and safetensors may write 0600 files); give the
    result the permissions an ordinary mkdir/open would have under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)

"""Hugging Face interop: cpt_jax reproduces transformers' logits on the fixtures made by
scripts/make_hf_fixtures.py, export/import round trips are bit-exact, bad input fails loudly,
and HF -> orbax params checkpoint -> HF conversion is bit-exact. No torch needed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from cpt_jax import hf
from cpt_jax.hf import load_hf_llama, save_hf_llama
from cpt_jax.model import forward
from cpt_jax.train.checkpoint import load_params, save_params
from tiny_runs import load_script

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
# jit: one compile per fixture config, much faster than flax's op-by-op eager execution
fwd = jax.jit(forward, static_argnums=0)
NAMES = ["gqa", "tied", "rope_theta", "llama3_scaling", "sharded", "bf16"]


def _load_convert_module():
    return load_script("convert_hf")


def hf_tensors(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a HF directory, by name, in their stored dtype."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, framework="np") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def assert_trees_bitwise_equal(a, b):
    fa, fb = hf_flat(a), hf_flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        assert fa[k].shape == fb[k].shape, k
        assert np.asarray(fa[k]).tobytes() == np.asarray(fb[k]).tobytes(), k


def hf_flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(hf_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


def copy_fixture(name, tmp_path) -> Path:
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    return d


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    config, params = load_hf_llama(FIXTURES / name)
    tokens = np.load(FIXTURES / name / "tokens.npy")
    want = np.load(FIXTURES / name / "logits.npy")
    got = np.asarray(fwd(config, params, tokens))
    assert got.dtype == np.float32 and got.shape == want.shape
    err = float(np.abs(got - want).max())
    print(f"{name}: max |logit error| = {err:.2e}")
    assert err <= 1e-4


def test_config_fields_mapped():
    c, p = load_hf_llama(FIXTURES / "gqa")
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.d_ff) == (128, 32, 2, 4, 2, 64)
    assert c.head_dim is None and c.rope_scaling is None and not c.tie_embeddings
    assert c.norm_eps == 1e-5 and c.max_seq_len == 64 and c.param_dtype == "float32"
    assert p["layers"]["attn"]["k"]["kernel"].shape == (2, 32, 2, 8)
    assert p["layers"]["attn"]["o"]["kernel"].shape == (2, 4, 8, 32)
    assert p["lm_head"]["kernel"].shape == (32, 128)

    c, p = load_hf_llama(FIXTURES / "tied")
    assert c.tie_embeddings and "lm_head" not in p

    c, _ = load_hf_llama(FIXTURES / "rope_theta")
    assert c.rope_theta == 500000.0 and c.head_dim == 16

    c, _ = load_hf_llama(FIXTURES / "llama3_scaling")
    assert dict(c.rope_scaling) == dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=16)


def test_llama3_fixture_exercises_scaling():
    """Without the scaling the llama3 fixture's logits must be clearly wrong, else the
    logits test above would not prove the scaling right."""
    import dataclasses

    config, params = load_hf_llama(FIXTURES / "llama3_scaling")
    tokens = np.load(FIXTURES / "llama3_scaling" / "tokens.npy")
    want = np.load(FIXTURES / "llama3_scaling" / "logits.npy")
    unscaled = np.asarray(fwd(dataclasses.replace(config, rope_scaling=None), params, tokens))
    assert np.abs(unscaled - want).max() > 1e-2


def test_sharded_fixture_uses_index():
    d = FIXTURES / "sharded"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (d / "model.safetensors").exists()
    _, p_sharded = load_hf_llama(d)
    assert p_sharded["layers"]["mlp"]["down"]["kernel"].shape == (2, 64, 32)


def test_bf16_loads():
    d = FIXTURES / "bf16"
    with safe_open(d / "model.safetensors", framework="np") as f:
        raw = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert raw.dtype == ml_dtypes.bfloat16
    c_keep, p_keep = load_hf_llama(d, param_dtype=None)
    c_f32, p_f32 = load_hf_llama(d)
    assert c_keep.param_dtype == "bfloat16" and c_f32.param_dtype == "float32"
    assert p_keep["embed"]["embedding"].dtype == ml_dtypes.bfloat16
    assert p_f32["embed"]["embedding"].dtype == np.float32
    # upcasting is exact
    for k, v in hf_flat(p_keep).items():
        np.testing.assert_array_equal(v.astype(np.float32), hf_flat(p_f32)[k])
    # q kernel [L, D, H, Dh] is the transposed torch [H*Dh, D] weight
    np.testing.assert_array_equal(p_keep["layers"]["attn"]["q"]["kernel"][0].reshape(32, 32), raw.T)


def test_raw_reader_matches_safe_open():
    path = FIXTURES / "bf16" / "model.safetensors"
    with safe_open(path, framework="np") as f:
        for name in f.keys():
            a, b = f.get_tensor(name), hf._read_raw(path, name)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_bit_exact(name, tmp_path):
    config, params = load_hf_llama(FIXTURES / name, param_dtype=None)
    save_hf_llama(config, params, tmp_path / "out")
    config2, params2 = load_hf_llama(tmp_path / "out", param_dtype=None)
    assert config2 == config
    assert_trees_bitwise_equal(params, params2)
    # and the tensors on disk are the fixture's, byte for byte
    want, got = hf_tensors(FIXTURES / name), hf_tensors(tmp_path / "out")
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and want[k].tobytes() == got[k].tobytes(), k


def test_saved_config_is_transformers_v4_layout(tmp_path):
    config, params = load_hf_llama(FIXTURES / "llama3_scaling")
    save_hf_llama(config, params, tmp_path / "out", dtype="bfloat16")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype"] == "bfloat16" and cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    with open(tmp_path / "out" / "model.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        body = f.read()
    meta = header.pop("__metadata__")
    assert meta.pop("format") == "pt"
    # the rest: each tensor's sha256, over its bytes as they lie in the file
    import hashlib

    assert meta == {f"cpt_jax.sha256.{name}": hashlib.sha256(
        body[info["data_offsets"][0]:info["data_offsets"][1]]).hexdigest()
        for name, info in header.items()}
    assert header["model.norm.weight"]["dtype"] == "BF16"


def test_save_shards_when_large(tmp_path):
    config, params = load_hf_llama(FIXTURES / "gqa")
    save_hf_llama(config, params, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(
        v.nbytes for v in hf_tensors(FIXTURES / "gqa").values())
    _, params2 = load_hf_llama(tmp_path / "out")
    assert_trees_bitwise_equal(params, params2)


def test_save_accepts_per_layer_params(tmp_path):
    """scan_layers=False trees (layers_0, layers_1, ...) export the same as stacked ones."""
    config, params = load_hf_llama(FIXTURES / "gqa")
    per_layer = {k: v for k, v in params.items() if k != "layers"}
    for i in range(config.n_layers):
        per_layer[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    save_hf_llama(config, per_layer, tmp_path / "out")
    _, params2 = load_hf_llama(tmp_path / "out")
    assert_trees_bitwise_equal(params, params2)


def test_save_refuses_non_empty_dir_and_overwrites_on_request(tmp_path):
    config, params = load_hf_llama(FIXTURES / "tied")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf_llama(config, params, out)
    assert (out / "keep.txt").exists()
    save_hf_llama(config, params, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


def test_failed_save_leaves_nothing(tmp_path):
    import dataclasses

    config, params = load_hf_llama(FIXTURES / "gqa")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight.*\(64, 32\).*\(48, 32\)"):
        save_hf_llama(dataclasses.replace(config, d_ff=48), params, tmp_path / "out")
    del params["final_norm"]  # fails after the first shards are written
    with pytest.raises(KeyError):
        save_hf_llama(config, params, tmp_path / "out", max_shard_bytes=20_000)
    assert list(tmp_path.iterdir()) == []


def test_saved_files_have_umask_permissions(tmp_path):
    config, params = load_hf_llama(FIXTURES / "tied")
    out = save_hf_llama(config, params, tmp_path / "out")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------- bad input


def test_tensor_shape_mismatch_names_tensor(tmp_path):
    d = copy_fixture("gqa", tmp_path)
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:60]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}.*\(60, 32\).*\(64, 32\)"):
        load_hf_llama(d)


def test_config_disagreeing_with_tensors_names_tensor(tmp_path):
    d = copy_fixture("gqa", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_key_value_heads"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight.*\(16, 32\).*\(32, 32\)"):
        load_hf_llama(d)


def test_missing_tensor_is_named(tmp_path):
    d = copy_fixture("gqa", tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tensor model.layers.1.post_attention_layernorm.weight is missing"):
        load_hf_llama(d)


@pytest.mark.parametrize("change, match", [
    ({"model_type": "mistral"}, "model_type"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "linear"),
])
def test_unsupported_config_errors(tmp_path, change, match):
    d = copy_fixture("tied", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_hf_llama(d)


def test_v4_style_rope_config_loads():
    """Hub checkpoints written by transformers v4 keep rope_theta/rope_scaling at top level."""
    c = hf.config_from_hf({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 10,
        "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert c.rope_theta == 500000.0 and c.rope_scaling["factor"] == 32.0
    assert c.n_kv_heads == 2  # defaults to num_attention_heads
    assert hf.config_from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                              "num_hidden_layers": 1, "num_attention_heads": 2,
                              "intermediate_size": 16,
                              "rope_scaling": {"type": "default"}}).rope_scaling is None


# ----------------------------------------------------------------------------- orbax


@pytest.mark.parametrize("name", ["gqa", "bf16", "sharded"])
def test_hf_to_orbax_to_hf_bit_exact(name, tmp_path):
    convert = _load_convert_module()
    convert.hf_to_orbax(str(FIXTURES / name), str(tmp_path / "ckpt"))
    dtype = "bfloat16" if name == "bf16" else None  # params are stored as float32
    convert.orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), dtype=dtype)
    want, got = hf_tensors(FIXTURES / name), hf_tensors(tmp_path / "hf")
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and want[k].tobytes() == got[k].tobytes(), k
    assert load_hf_llama(tmp_path / "hf")[0] == load_hf_llama(FIXTURES / name)[0]


def test_convert_script_cli(tmp_path):
    script = str(ROOT / "scripts" / "convert_hf.py")
    run = lambda *a: subprocess.run([sys.executable, script, *a], check=True,
                                    capture_output=True, text=True)
    run("hf-to-orbax", "--hf", str(FIXTURES / "bf16"), "--out", str(tmp_path / "ckpt"))
    run("orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"),
        "--dtype", "bfloat16")
    want, got = hf_tensors(FIXTURES / "bf16"), hf_tensors(tmp_path / "hf")
    assert all(want[k].tobytes() == got[k].tobytes() for k in want) and want.keys() == got.keys()
    proc = subprocess.run([sys.executable, script, "orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"),
                           "--out", str(tmp_path / "hf")], capture_output=True, text=True)
    assert proc.returncode != 0 and "overwrite" in proc.stderr


def test_params_checkpoint_round_trip_and_sharded_restore(tmp_path):
    config, params = load_hf_llama(FIXTURES / "gqa")
    save_params(tmp_path / "ckpt", config, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    config2, params2 = load_params(tmp_path / "ckpt")
    assert config2 == config
    assert_trees_bitwise_equal(params, params2)

    mesh = jax.make_mesh((8,), ("fsdp",))
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, P()), params)
    shardings["embed"]["embedding"] = NamedSharding(mesh, P("fsdp", None))  # [V=128, D] split on V
    _, params3 = load_params(tmp_path / "ckpt", shardings, expected_config=config)
    emb = params3["embed"]["embedding"]
    assert isinstance(emb, jax.Array) and emb.sharding == shardings["embed"]["embedding"]
    assert emb.addressable_shards[0].data.shape == (16, 32)
    assert_trees_bitwise_equal(params, jax.tree.map(np.asarray, params3))


def test_params_checkpoint_errors(tmp_path):
    import dataclasses

    config, params = load_hf_llama(FIXTURES / "gqa")
    save_params(tmp_path / "ckpt", config, params)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_params(tmp_path / "ckpt", config, params)
    other = dataclasses.replace(config, d_ff=48)
    with pytest.raises(ValueError, match=r"layers/mlp/down/kernel.*\(2, 64, 32\).*\(2, 48, 32\)"):
        load_params(tmp_path / "ckpt", expected_config=other)
    with pytest.raises(ValueError, match="scan_layers"):
        load_params(tmp_path / "ckpt", expected_config=dataclasses.replace(config, scan_layers=False))
    with pytest.raises(ValueError, match=r"layers/attn/o/kernel.*\(2, 4, 8, 32\)"):  # params disagree
        save_params(tmp_path / "ckpt2", dataclasses.replace(config, n_heads=8, n_kv_heads=2,
                                                            head_dim=8), params)
    assert not (tmp_path / "ckpt2").exists()


# ----------------------------------------------------------------------------- tokenizer export


def _tiny_spm(path: Path, byte_fallback=False) -> Path:
    """A tiny SentencePiece BPE model: without byte fallback it fits the fixtures' 128 ids,
    with it (256 byte pieces) it does not."""
    import sentencepiece as spm

    text = ["the cat sat on the mat", "  def f(x):\n    return x", "a dog ran fast"] * 30
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(path.with_suffix("")),
        vocab_size=300 if byte_fallback else 60, byte_fallback=byte_fallback, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False,
        remove_extra_whitespaces=False, minloglevel=2)
    return path


def test_orbax_to_hf_writes_the_tokenizer_and_token_ids(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    import sentencepiece as spm

    convert = _load_convert_module()
    model = _tiny_spm(tmp_path / "tok.model")
    convert.hf_to_orbax(str(FIXTURES / "gqa"), str(tmp_path / "ckpt"))
    script = str(ROOT / "scripts" / "convert_hf.py")
    proc = subprocess.run([sys.executable, script, "orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"),
                           "--out", str(tmp_path / "hf"), "--tokenizer", str(model)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    out = tmp_path / "hf"
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 3)
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 3)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in ["  def f(x):", " the cat", "mat\n  sat  "]:
        assert tok.encode(text).ids == [1] + sp.encode(text)
    assert load_hf_llama(out)[0] == load_hf_llama(FIXTURES / "gqa")[0]


def test_orbax_to_hf_finds_the_run_tokenizer_or_warns(tmp_path):
    convert = _load_convert_module()
    model = _tiny_spm(tmp_path / "tok.model")
    run = tmp_path / "run"
    convert.hf_to_orbax(str(FIXTURES / "tied"), str(run / "final_params"))
    script = str(ROOT / "scripts" / "convert_hf.py")

    def export(out):
        return subprocess.run([sys.executable, script, "orbax-to-hf", "--ckpt",
                               str(run / "final_params"), "--out", str(tmp_path / out)],
                              capture_output=True, text=True)

    proc = export("bare")  # no results.json beside the checkpoint: no tokenizer, a warning
    assert proc.returncode == 0
    assert "warning:" in proc.stderr and "--tokenizer PATH" in proc.stderr
    assert not (tmp_path / "bare" / "tokenizer.json").exists()
    config = {"model": {"vocab_size": 128}, "tokenizer": {"path": str(model)}}
    (run / "results.json").write_text(json.dumps({"config": config}))
    proc = export("found")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    assert (tmp_path / "found" / "tokenizer.model").read_bytes() == model.read_bytes()


def test_tokenizer_larger_than_the_model_is_refused(tmp_path):
    model = _tiny_spm(tmp_path / "tok.model", byte_fallback=True)
    config, params = load_hf_llama(FIXTURES / "gqa")  # 128 embeddings
    with pytest.raises(ValueError, match=r"tok.model has \d+ tokens but the model has only 128 emb"):
        save_hf_llama(config, params, tmp_path / "out", tokenizer=str(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.model", "tok.vocab"]


def test_invalid_safetensors_file_is_named(tmp_path):
    d = copy_fixture("gqa", tmp_path)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=rf"{d / 'model.safetensors'} is not a valid safetensors"):
        load_hf_llama(d)
    s = copy_fixture("sharded", tmp_path)
    (s / "model-00002-of-00003.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match=r"model-00002-of-00003.safetensors is not a valid"):
        load_hf_llama(s)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_hf.py"), "hf-to-orbax",
                           "--hf", str(d), "--out", str(tmp_path / "ckpt")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("convert_hf.py: error: ")
    assert str(d / "model.safetensors") in proc.stderr

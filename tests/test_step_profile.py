"""Where a step's time goes: traced XLA ops matched to their HLO instructions and kinds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpt_jax import model as model_lib
from cpt_jax import sharding as sharding_lib
from cpt_jax.core.state import Placement, create_train_state
from cpt_jax.eval.step_profile import hlo_instructions, hlo_parts, layer_part, profile_step
from cpt_jax.methods.replay import replay_mix
from cpt_jax.train.step import make_train_step

HLO = """HloModule m, entry_computation_layout={(f32[4,4]{1,0})->f32[4]{0}}

%inner_dot (a: f32[4,4], b: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  ROOT %d = f32[4,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%outer (p: f32[4,4]) -> f32[4,4] {
  %p = f32[4,4]{1,0} parameter(0)
  ROOT %f = f32[4,4]{1,0} fusion(%p, %p), kind=kOutput, calls=%inner_dot
}

%moves (q: f32[4,4]) -> f32[4,4] {
  %q = f32[4,4]{1,0} parameter(0)
  ROOT %t = f32[4,4]{0,1} transpose(%q), dimensions={1,0}
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

ENTRY %main (arg: f32[4,4]) -> f32[4] {
  %arg = f32[4,4]{1,0} parameter(0)
  %nested = f32[4,4]{1,0} fusion(%arg), kind=kLoop, calls=%outer
  %moved = f32[4,4]{0,1} fusion(%nested), kind=kLoop, calls=%moves
  %ew = f32[4,4]{1,0} multiply(%moved, %moved)
  %zero = f32[] constant(0)
  %loop = (s32[], f32[4,4]{1,0}) while(%tup), condition=%cond, body=%outer
  ROOT %r = f32[4]{0} reduce(%ew, %zero), dimensions={1}, to_apply=%add
}
"""


def test_instructions_get_their_kind_from_what_they_compute():
    table = hlo_instructions(HLO)
    assert table["nested"] == ("fusion", "matmul")  # a dot two computations down
    assert table["moved"] == ("fusion", "copy")  # a fusion of a transpose only
    assert table["ew"] == ("multiply", "elementwise")
    assert table["r"] == ("reduce", "reduce")  # its to_apply adds, but it reduces
    assert table["loop"] == ("while", "container")
    assert table["d"] == ("dot", "matmul") and table["t"] == ("transpose", "copy")


def test_a_matmul_bound_step_is_attributed_to_its_matmul():
    # 1024: each matmul (2 GFLOP) takes several times the tanh over its 1M outputs; at
    # 384 a tanh could outlast one of the two matmuls on a loaded machine
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1024, 1024)), jnp.float32)
    f = jax.jit(lambda a: jnp.tanh(a @ a @ a) + 1.0)
    compiled = f.lower(x).compile()
    jax.block_until_ready(compiled(x))
    out = profile_step(lambda: jax.block_until_ready(compiled(x)), compiled.as_text(), steps=5)
    table = hlo_instructions(compiled.as_text())
    assert out["op_ms"] > 0 and out["step_ms"] > 0
    assert all(t["op"] in table for t in out["top"])
    assert abs(sum(out["by_kind"].values()) - out["op_ms"]) < 1e-6
    # two 1024^3 matmuls dominate one tanh over 1024^2 elements
    assert out["by_kind"]["matmul"] > out["by_kind"]["elementwise"]
    assert out["top"][0]["kind"] == "matmul"


def test_the_peers_aten_ops_are_sorted_into_the_same_kinds():
    from cpt_jax.peer_torch import op_kind

    want = {"aten::mm": "matmul", "aten::addmm": "matmul", "aten::bmm": "matmul",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "matmul",
            "aten::copy_": "copy", "aten::t": "copy", "aten::index_select": "copy",
            "aten::sum": "reduce", "aten::_foreach_norm": "reduce",
            "aten::tanh": "elementwise", "aten::mul": "elementwise", "aten::topk":
            "elementwise", "aten::_log_softmax": "elementwise",
            "autograd::engine::evaluate_function: MmBackward0": "other"}
    assert {name: op_kind(name) for name in want} == want


def test_layer_parts_are_read_off_the_module_path():
    assert layer_part("jit(train_step)/jvp(Llama)/while/body/closed_call/layers/attn_norm/"
                      "reduce_sum") == "attn_norm forward"
    assert layer_part("jit(train_step)/transpose(jvp(Llama))/while/body/closed_call/layers/"
                      "attn/blkgd,bskd->bkgls/dot_general") == "attn backward"
    assert layer_part("jit(train_step)/jvp(Llama)/while/body/layers/mlp/mul") == "mlp forward"
    assert layer_part("jit(train_step)/jvp()/cross_entropy/while/body/dot_general") == (
        "cross_entropy")
    assert layer_part("jit(train_step)/jvp(Llama)/while/body/jit(dynamic_update_index_in_dim)"
                      "/dynamic_update_slice") == "layer scan"
    assert layer_part("jit(train_step)/cond/branch_1_fun/mul") == "other"
    assert layer_part("") == "other"


def test_every_matmul_of_a_train_step_is_in_a_model_part():
    """On a real train step: the forward and backward ops of attention and the MLP and
    the fused cross-entropy are told apart, and every dot (a matmul) lands in one of the
    model's parts, none in "other" (the optimizer and metrics have no matmul)."""
    mcfg = model_lib.LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                 n_kv_heads=2, d_ff=64, max_seq_len=16)
    mesh = sharding_lib.make_mesh({"data": 1}, jax.devices()[:1])
    tx = optax.chain(replay_mix(), optax.adamw(1e-3))  # the step hands per-source grads
    state, shardings = create_train_state(mcfg, tx, mesh, sharding_lib.DEFAULT_RULES,
                                          jax.random.key(0))
    step = make_train_step(Placement(mcfg, mesh, sharding_lib.DEFAULT_RULES, shardings), tx)
    batch = {"tokens": np.ones((4, 17), np.int32), "segment_ids": np.ones((4, 17), np.int32)}
    text = step.lower(state, batch).compile().as_text()
    parts, table = hlo_parts(text), hlo_instructions(text)
    assert {"attn forward", "attn backward", "mlp forward", "mlp backward", "cross_entropy",
            "layer scan", "other"} <= set(parts.values())
    dots = [n for n, (opcode, _) in table.items() if opcode == "dot"]
    assert dots and all(parts[n] != "other" for n in dots), [
        (n, parts[n]) for n in dots if parts[n] == "other"]

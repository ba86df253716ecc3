"""Where a compiled step's time goes, op by op: JAX's profiler traces a few steps, and each
traced XLA op is matched to its instruction in the step's optimised HLO, which says what
kind of work it is.

Kinds: ``matmul`` (a dot or convolution, or a fusion whose computation holds one: the
work a faster kernel speeds up), ``copy`` (copies, transposes, concatenations, dynamic
slices and updates, broadcasts: data movement a better layout removes), ``reduce``
(reductions and the fusions built around one) and ``elementwise`` (every other fusion
and op). A ``while`` (the scan over layers) or ``call`` is a container: the ops it runs
are counted themselves, and its own inclusive time is reported apart (``containers``).
Parts (``by_part``): each op is also put in the part of the model it computes, read off
its ``op_name`` metadata, i.e. the Flax module path (``layer_part``): ``attn``, ``mlp``,
their norms, ``final_norm``, ``embed`` and ``lm_head``, each forward or backward (the
backward ops are JAX's transposes), the fused ``cross_entropy`` (its forward pass also
forms its gradient), ``layer scan`` (the layer loop's own slicing and stacking) and
``other`` (optimizer, step guard, metrics).
``scripts/benchmark.py --profile`` prints the result.

The per-op times are the trace's durations, summed over the traced steps and divided by
their number. Ops on different threads can overlap, so the kinds may add up to more than
the step's wall time (``step_ms``).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_MOVES = ("copy", "transpose", "concatenate", "dynamic-slice", "dynamic-update-slice",
          "broadcast", "slice", "pad", "gather", "scatter", "reshape", "bitcast")
KINDS = ("matmul", "copy", "reduce", "elementwise")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# module names in op_name paths, most specific first (attn_norm before attn)
PARTS = ("attn_norm", "mlp_norm", "final_norm", "attn", "mlp", "embed", "lm_head",
         "cross_entropy")
_CONTAINERS = ("while", "call", "conditional")


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (opcode, kind)} of an optimised HLO module's text."""
    bodies: dict[str, list[tuple[str, list[str]]]] = {}  # computation -> [(opcode, calls)]
    instructions: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("{")[0]:
            current = bodies.setdefault(head.group(1), [])
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            entry = (m.group(2), _CALLS.findall(line))
            current.append(entry)
            instructions[m.group(1)] = entry

    def opcodes(computation: str, seen: set) -> set[str]:
        """Every opcode of ``computation`` and of the computations it calls."""
        if computation in seen:
            return set()
        seen.add(computation)
        out = set()
        for opcode, called in bodies.get(computation, ()):
            out.add(opcode)
            for c in called:
                out |= opcodes(c, seen)
        return out

    def kind(opcode: str, called: list[str]) -> str:
        if opcode in _CONTAINERS:
            return "container"
        inner = set().union(*(opcodes(c, set()) for c in called)) if called else set()
        ops = {opcode} | inner
        if ops & {"dot", "convolution"}:
            return "matmul"
        if ops & {"reduce", "reduce-window"}:
            return "reduce"
        if opcode in _MOVES or (opcode == "fusion" and inner and inner <= set(_MOVES) | {
                "parameter", "constant", "tuple", "get-tuple-element"}):
            return "copy"
        return "elementwise"

    return {name: (opcode, kind(opcode, called))
            for name, (opcode, called) in instructions.items()}


def layer_part(op_name: str) -> str:
    """The model part an op's ``op_name`` (e.g.
    ``jit(train_step)/transpose(jvp(Llama))/while/body/layers/mlp/dot_general``) names:
    "mlp backward", "attn_norm forward", "cross_entropy", "layer scan" (the rest of the
    layer loop: ``nn.scan`` slicing each layer's weights and residuals out of their
    stacks and writing them back) or "other"."""
    segments = set(re.split(r"[/()]", op_name))
    part = next((p for p in PARTS if p in segments), None)
    if part is None:  # inside the layer loop but no module's: the scan's own slicing
        return "layer scan" if "Llama" in op_name and "/while/body/" in op_name else "other"
    if part == "cross_entropy":
        return part
    return f"{part} {'backward' if 'transpose(' in op_name else 'forward'}"


def hlo_parts(hlo_text: str) -> dict[str, str]:
    """{instruction name: ``layer_part`` of its op_name} of an HLO module's text (a fusion
    carries the op_name of the op it was built around)."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            name = _OP_NAME.search(line)
            out[m.group(1)] = layer_part(name.group(1) if name else "")
    return out


def _trace_events(trace_dir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise RuntimeError(f"the profiler wrote no trace under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def profile_step(step, hlo_text: str, steps: int = 5, top: int = 15) -> dict:
    """Trace ``steps`` calls of ``step()`` (which must block until its result is ready) and
    attribute the traced op time to the instructions of ``hlo_text``.

    Returns {"step_ms", "op_ms", "by_kind": {kind: ms per step}, "by_part": {part: ms per
    step}, "containers": {name: ms}, "top": [{"op", "opcode", "kind", "part", "ms",
    "share"}]}, ``share`` being the op's fraction of ``op_ms``."""
    table, parts = hlo_instructions(hlo_text), hlo_parts(hlo_text)
    with tempfile.TemporaryDirectory(prefix="cpt_jax_profile_") as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        t0 = time.perf_counter()
        try:
            for _ in range(steps):
                step()
        finally:
            wall = time.perf_counter() - t0
            jax.profiler.stop_trace()
        events = _trace_events(trace_dir)
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in table:
            total[e["name"]] += float(e.get("dur", 0.0)) / 1000.0  # us -> ms
    per_step = {name: ms / steps for name, ms in total.items()}
    containers = {n: ms for n, ms in per_step.items() if table[n][1] == "container"}
    per_step = {n: ms for n, ms in per_step.items() if n not in containers}
    op_ms = sum(per_step.values())
    by_kind = {k: 0.0 for k in KINDS}
    for name, ms in per_step.items():
        by_kind[table[name][1]] += ms
    by_part = collections.Counter()
    for name, ms in per_step.items():
        by_part[parts.get(name, "other")] += ms
    ranked = sorted(per_step.items(), key=lambda kv: -kv[1])[:top]
    return {"step_ms": wall / steps * 1000.0, "op_ms": op_ms, "by_kind": by_kind,
            "by_part": dict(by_part.most_common()), "containers": containers,
            "top": [{"op": name, "opcode": table[name][0], "kind": table[name][1],
                     "part": parts.get(name, "other"), "ms": ms,
                     "share": ms / op_ms if op_ms else 0.0} for name, ms in ranked]}

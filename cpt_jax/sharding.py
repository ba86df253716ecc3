"""Device mesh, logical-axis rules and shardings.

The model names every parameter and activation axis logically (``embed``, ``heads``, ...);
the rules here, taken from the config, map those names onto the mesh axes ``data``,
``fsdp`` and ``tensor``. Rules are applied in order and a mesh axis already used by an
earlier dimension of the same array is skipped (Flax's priority semantics), so ``embed`` is
sharded over ``fsdp`` in weights but not in activations, whose ``batch`` takes ``fsdp`` first.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axes). Order matters: the first applicable rule wins.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
)


def mesh_shape(axes: dict, n_devices: int) -> tuple[int, ...]:
    """Resolve a {data, fsdp, tensor} -> size mapping where one size may be -1 (the rest)."""
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} unknown; use {MESH_AXES}")
    sizes = [int(axes.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(axes)}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh {dict(axes)}: {n_devices} devices not divisible by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(
            f"mesh {dict(axes)} needs {math.prod(sizes)} devices but {n_devices} are present; "
            "set one axis to -1 to take the remaining devices")
    return tuple(sizes)


def make_mesh(axes: dict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over all (or the given) devices with axes (data, fsdp, tensor)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(axes, len(devices))
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def rules_from_config(rules) -> tuple[tuple[str, object], ...]:
    """Config rules are a list of [name, mesh_axis | [mesh_axes] | None]; tuples for Flax."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for name, axes in rules:
        out.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(out)


def logical_to_sharding(logical_specs, mesh: Mesh, rules) -> object:
    """Map a pytree of logical PartitionSpecs to NamedShardings on mesh."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over (data, fsdp); other dimensions replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (the number of batch shards)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def distributed_kwargs(dist) -> dict:
    """Keyword arguments for ``jax.distributed.initialize`` from ``config.distributed``.

    Fields left at their "unset" values (None, coordinator_address "", num_processes <= 0,
    process_id < 0, empty local_device_ids) are omitted, so JAX discovers them itself on TPU
    VMs, under Slurm and Open MPI; passing them through would override auto-detection.
    """
    kwargs = {}
    address = dist.get("coordinator_address")
    if address:
        kwargs["coordinator_address"] = str(address)
    n = dist.get("num_processes")
    if n is not None and int(n) > 0:
        kwargs["num_processes"] = int(n)
    pid = dist.get("process_id")
    if pid is not None and int(pid) >= 0:
        kwargs["process_id"] = int(pid)
    ids = dist.get("local_device_ids")
    if isinstance(ids, int) and not isinstance(ids, bool):
        kwargs["local_device_ids"] = [ids]
    elif ids is not None and ids != "" and len(ids):
        kwargs["local_device_ids"] = [int(i) for i in ids]
    return kwargs


def maybe_initialize_distributed(config) -> None:
    """Join a multi-process JAX run (TPU pod slice, multi-node GPU, CPU hosts) when the
    config says so (``config.distributed.enabled``).

    ``config.distributed`` may hold coordinator_address, num_processes, process_id (and
    local_device_ids); unset ones are discovered automatically on TPU VMs and under Slurm
    (see ``distributed_kwargs``). Cross-process collectives of the CPU backend use gloo
    unless ``jax_cpu_collectives_implementation`` is already set (e.g. to "mpi"); without
    an implementation CPU computations spanning processes fail. Must run before any other
    JAX call; a second call (the process already joined) does nothing.
    """
    dist = config.get("distributed") if hasattr(config, "get") else None
    if not dist or not dist.get("enabled", False):
        return
    if getattr(jax.distributed, "is_initialized", lambda: False)():
        return
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**distributed_kwargs(dist))


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """Make `mesh` the ambient mesh and `rules` the logical-axis rules while tracing, so the
    model's logical sharding constraints apply."""
    if hasattr(jax, "set_mesh"):
        mesh_ctx = jax.set_mesh(mesh)
    elif hasattr(jax.sharding, "use_mesh"):
        mesh_ctx = jax.sharding.use_mesh(mesh)
    else:
        mesh_ctx = contextlib.nullcontext()
    with mesh_ctx, nn.logical_axis_rules(rules):
        yield

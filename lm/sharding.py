"""Device mesh and the one table of logical-axis rules that lays parameters and activations out on it.

Every parameter and activation carries logical axis names (`batch`, `embed`, `heads`, ...; see lm.model).
`RULES` maps each name to mesh axes; shardings of a whole train state are derived from `jax.eval_shape`
of its boxed init, so no tensor is ever laid out by hand. Default mesh axes: `data` (pure data
parallelism), `fsdp` (batch *and* parameters split: ZeRO-3 style), `tensor` (Megatron-style head/MLP split).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. When two dims of one tensor ask for the same mesh axis, the first keeps it
# (activations [batch, length, embed] put fsdp on batch, so embed stays whole there).
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
    ("lora", "fsdp"),  # a LoRA rank dim: sharded where its kernel dim on fsdp would not be
)

log = logging.getLogger(__name__)


def rules_from_config(table: Optional[Mapping[str, str]]) -> tuple[tuple[str, Any], ...]:
    """Rules from a config mapping `{logical: "axis" | "axis1,axis2" | ""}` ("" = replicated); None -> RULES."""
    if table is None:
        return RULES
    rules = []
    for name, axes in dict(table).items():
        parts = tuple(a.strip() for a in (axes or "").split(",") if a.strip())
        rules.append((name, None if not parts else parts[0] if len(parts) == 1 else parts))
    return tuple(rules)


def make_mesh(shape: Sequence[int], axes: Sequence[str] = AXES, devices=None) -> Mesh:
    """A mesh of `shape` over `axes`; one entry may be -1 and takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape, axes = tuple(int(s) for s in shape), tuple(axes)
    if len(shape) != len(axes):
        raise ValueError(f"mesh.shape {shape} and mesh.axes {axes} differ in length")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape {shape}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh.shape {shape}: {len(devices)} devices are not divisible by {known}")
        shape = tuple(len(devices) // known if s == -1 else s for s in shape)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh.shape {shape} needs {math.prod(shape)} devices, but {len(devices)} are present")
    # Auto axes: XLA's partitioner propagates the shardings we pin on parameters, inputs and activations.
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def _divisible(sharding: NamedSharding, shape, name: str) -> NamedSharding:
    """Replicate every dim of `shape` that its mesh axes do not divide evenly (logged, naming the tensor)."""
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, (dim, axes) in enumerate(zip(shape, spec)):
        size = _axis_size(sharding.mesh, axes)
        if dim % size:
            log.warning("%s: dim %d of shape %s is not divisible by mesh axes %s (size %d); replicating that dim",
                        name, i, tuple(shape), axes, size)
            spec[i] = None
    return NamedSharding(sharding.mesh, P(*spec))


def tree_shardings(abstract_boxed, mesh: Mesh, rules=RULES):
    """NamedShardings for a tree of (boxed, logically named) abstract arrays, e.g. `jax.eval_shape(init)`.

    Leaves without names (step counters, RNG keys, optimiser counts) are replicated. A dim whose mesh axes
    do not divide it is replicated instead (e.g. 2 kv_heads on a tensor axis of 4), with a warning.
    """
    specs = nn.get_partition_spec(abstract_boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    shapes = nn.unbox(abstract_boxed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    shard_leaves = treedef.flatten_up_to(shardings)
    out = [_divisible(s, leaf.shape, jax.tree_util.keystr(path)) for (path, leaf), s in zip(flat, shard_leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def batch_axes(rules=RULES):
    """Mesh axes the `batch` logical axis maps to (a tuple, possibly empty)."""
    axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def batch_sharding(mesh: Mesh, ndim: int, rules=RULES) -> NamedSharding:
    """Sharding of a `[B, ...]` batch array: rows split over the batch mesh axes, the rest replicated."""
    axes = batch_axes(rules)
    return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh, rules=RULES) -> int:
    """How many ways the batch dim is split."""
    return _axis_size(mesh, batch_axes(rules))


def global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules=RULES) -> dict:
    """Global jax.Arrays from this process's rows of a batch (each process passes its own rows)."""
    out = {}
    for key, x in batch.items():
        x = np.asarray(x)
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x)
    return out


def check_batch(batch_size: int, micro_batches: int, mesh: Mesh, rules=RULES) -> None:
    """Fail early, naming the numbers, when a global batch cannot be split into micro-batches and shards."""
    n = data_parallel_size(mesh, rules)
    if batch_size % micro_batches or (batch_size // micro_batches) % n:
        raise ValueError(f"train.batch_size={batch_size} must split into train.micro_batches={micro_batches} "
                         f"micro-batches whose size is a multiple of the data-parallel size {n} "
                         f"(mesh {dict(mesh.shape)}, batch axes {batch_axes(rules)})")

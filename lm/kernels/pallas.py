"""The `attention_impl="pallas"` implementation: Pallas kernels with the signatures of `reference`.

Importing this module registers it with `lm.kernels` (done lazily the first time "pallas" is asked for).
`interpret=None` runs interpret mode on CPU and the compiled kernel on TPU/GPU. Under a mesh
(`jax.set_mesh`), each kernel runs inside `jax.shard_map`: batch over the mesh axes "data" and "fsdp",
heads over "tensor" (whichever of them the mesh has and that divide the sizes; the rest, such as a sliding
window, is replicated), so every device runs the kernel on its own rows and heads with no communication.
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm import kernels
from lm.kernels import decode, flash, rotary

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def _mesh_axes(batch: int, heads: tuple[int, ...]):
    """(mesh, batch axes or None, head axis or None) for the current mesh, or None without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    free = [a for a in mesh.axis_names if a not in set(mesh.manual_axes)]
    batch_axes = tuple(a for a in BATCH_AXES if a in free)
    if not batch_axes or batch % math.prod(mesh.shape[a] for a in batch_axes):
        batch_axes = None
    head_axis = HEAD_AXIS if HEAD_AXIS in free else None
    if head_axis and any(h % mesh.shape[head_axis] for h in heads):
        head_axis = None
    if batch_axes is None and head_axis is None:
        return None
    return mesh, batch_axes, head_axis


def _sharded(fn, args: dict, specs: dict, out_spec: tuple, batch: int, heads: tuple[int, ...]):
    """`fn(**args)`, inside shard_map when a mesh is active. specs name dims "b" (batch) or "h" (heads)."""
    args = {k: v for k, v in args.items() if v is not None}
    axes = _mesh_axes(batch, heads)
    if axes is None:
        return fn(**args)
    mesh, batch_axes, head_axis = axes
    to_spec = lambda dims: P(*({"b": batch_axes, "h": head_axis}.get(d) for d in dims))  # noqa: E731
    in_specs = {k: to_spec(specs[k]) for k in args}
    if mesh.explicit_axes:  # explicit-sharding meshes do not reshard implicitly at the shard_map boundary
        args = {k: jax.sharding.reshard(v, in_specs[k]) for k, v in args.items()}
    return jax.shard_map(lambda a: fn(**a), mesh=mesh, in_specs=(in_specs,), out_specs=to_spec(out_spec),
                         check_vma=False)(args)


def _scalar(window):
    """A Python-int window as an int32 array, so shard_map can take it as a replicated input."""
    return None if window is None else jnp.asarray(window, jnp.int32)


def flash_attention(q, k, v, *, causal: bool = True, prefix_len=None, alibi_slopes=None, segment_ids=None,
                    sm_scale: Optional[float] = None, window=None, softcap: Optional[float] = None,
                    block_q: int = 128, block_k: int = 128, interpret=None):
    """Flash attention kernel (forward and backward); see `reference.flash_attention` for the arguments."""
    def fn(q, k, v, prefix_len=None, alibi_slopes=None, segment_ids=None, window=None):
        return flash.flash_attention(q, k, v, causal=causal, prefix_len=prefix_len, alibi_slopes=alibi_slopes,
                                     segment_ids=segment_ids, sm_scale=sm_scale, window=window, softcap=softcap,
                                     block_q=block_q, block_k=block_k, interpret=interpret)

    args = dict(q=q, k=k, v=v, prefix_len=prefix_len, alibi_slopes=alibi_slopes, segment_ids=segment_ids,
                window=_scalar(window))
    specs = dict(q="b.h.", k="b.h.", v="b.h.", prefix_len="b", alibi_slopes="h", segment_ids="b.", window="")
    return _sharded(fn, args, specs, "b.h.", q.shape[0], (q.shape[2], k.shape[2]))


def decode_attention(q, k_cache, v_cache, lengths, *, alibi_slopes=None, sm_scale: Optional[float] = None,
                     window=None, softcap: Optional[float] = None, block_k: int = 128, interpret=None):
    """Split-K decode attention kernel; see `reference.decode_attention` for the arguments."""
    def fn(q, k_cache, v_cache, lengths, alibi_slopes=None, window=None):
        return decode.decode_attention(q, k_cache, v_cache, lengths, alibi_slopes=alibi_slopes, sm_scale=sm_scale,
                                       window=window, softcap=softcap, block_k=block_k, interpret=interpret)

    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, lengths=lengths, alibi_slopes=alibi_slopes,
                window=_scalar(window))
    specs = dict(q="bh.", k_cache="bh..", v_cache="bh..", lengths="b", alibi_slopes="h", window="")
    return _sharded(fn, args, specs, "bh.", q.shape[0], (q.shape[1], k_cache.shape[1]))


def rope(x, positions, *, theta: float = 10000.0, rotary_dim: Optional[int] = None, interleaved: bool = False,
         scaling=None, interpret=None):
    """RoPE kernel fused over heads; see `reference.rope` for the arguments."""
    def fn(x, positions):
        return rotary.rope(x, positions, theta=theta, rotary_dim=rotary_dim, interleaved=interleaved,
                           scaling=scaling, interpret=interpret)

    specs = dict(x="b.h.", positions="b." + "." * (positions.ndim - 2))
    return _sharded(fn, dict(x=x, positions=positions), specs, "b.h.", x.shape[0], (x.shape[2],))


kernels.register("pallas", sys.modules[__name__])

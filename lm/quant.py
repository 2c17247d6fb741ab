"""Block-wise weight quantisation (int8, int4 and NF4) of Dense kernels: pure functions of arrays.

A kernel `[*in_dims, *features]` is cut into blocks of `block` consecutive entries along one input axis (the
last contracting axis, so a block is `block` consecutive inputs of one output column, as bitsandbytes' blocks
of a row-major `[out, in]` weight); each block keeps its absolute maximum as a float32 scale.
- int8: `code = round(127 * w / absmax)`, stored int8.
- nf4 (QLoRA, Dettmers et al. 2023): the index of the nearest of 16 normal-quantile levels of `w / absmax`,
  two 4-bit indices packed per uint8 along the blocked axis (even entry in the low nibble).
- int4 (weight-only int4 inference, as ChatGLM-6B's): the same with the uniform levels `(i - 8) / 7`, i.e.
  `round(7 * w / absmax)` in [-7, 7] stored with an offset of 8.
Dequantisation (`dequantize`) runs inside the matmul of lm.model.Dense, so only the codes stay resident.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

FORMATS = ("int8", "int4", "nf4")

# QLoRA's NormalFloat4 levels (bitsandbytes' table): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)


# The 16 values a 4-bit index stands for (times the block's absmax), ascending.
LEVELS4 = {"nf4": NF4_LEVELS, "int4": ((np.arange(16) - 8) / 7).astype(np.float32)}


def _check(fmt: str):
    if fmt not in FORMATS:
        raise ValueError(f"quantisation format {fmt!r} is not one of {FORMATS}")


def block_size(dim: int, block: int, where: str = "") -> int:
    """The block used along an axis of `dim` entries: `block`, or the whole axis when it is shorter."""
    b = min(block, dim)
    if b < 1 or dim % b or b % 2:
        raise ValueError(f"{where or 'quantisation'}: an axis of {dim} entries does not split into blocks of {b} "
                         f"(an even number dividing it); set model.overrides.quant_block / peft.quant_block")
    return b


def shapes(shape: tuple, fmt: str, block: int, axis: int, where: str = "") -> tuple[tuple, np.dtype, tuple]:
    """`(codes shape, codes dtype, scale shape)` of a kernel of `shape` quantised along `axis`."""
    _check(fmt)
    b = block_size(shape[axis], block, where)
    codes = list(shape)
    if fmt in LEVELS4:
        codes[axis] //= 2
    scale = list(shape)
    scale[axis] //= b
    return tuple(codes), np.dtype(np.int8 if fmt == "int8" else np.uint8), tuple(scale)


def _blocks(w, b: int, axis: int):
    """`[..., K, ...] -> [..., K / b, b, ...]`."""
    return w.reshape(w.shape[:axis] + (w.shape[axis] // b, b) + w.shape[axis + 1:])


def quantize(w, fmt: str, block: int, axis: int):
    """`(codes, scale)` of the float kernel `w` (see the module docstring); `axis` is the blocked input axis."""
    _check(fmt)
    axis = axis % w.ndim
    b = block_size(w.shape[axis], block)
    x = _blocks(jnp.asarray(w, jnp.float32), b, axis)
    absmax = jnp.max(jnp.abs(x), axis=axis + 1, keepdims=True)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    x = (x / safe).reshape(w.shape)
    scale = absmax.reshape(absmax.shape[:axis + 1] + absmax.shape[axis + 2:])
    if fmt == "int8":
        return jnp.clip(jnp.round(x * 127.0), -127, 127).astype(jnp.int8), scale
    levels = LEVELS4[fmt]
    mid = (levels[1:] + levels[:-1]) / 2  # nearest level = number of midpoints below
    idx = jnp.searchsorted(jnp.asarray(mid), x).astype(jnp.uint8)
    pairs = idx.reshape(idx.shape[:axis] + (idx.shape[axis] // 2, 2) + idx.shape[axis + 1:])
    lo, hi = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
    return (lo | (hi << 4)).astype(jnp.uint8), scale


def dequantize(codes, scale, fmt: str, axis: int, dtype=jnp.float32):
    """The kernel `codes`/`scale` stand for, in `dtype` (the inverse of `quantize` up to rounding)."""
    _check(fmt)
    axis = axis % codes.ndim
    if fmt == "int8":
        x = codes.astype(jnp.float32) / 127.0
    else:
        idx = jnp.stack([codes & 15, codes >> 4], axis=axis + 1)
        idx = idx.reshape(codes.shape[:axis] + (codes.shape[axis] * 2,) + codes.shape[axis + 1:])
        x = jnp.take(jnp.asarray(LEVELS4[fmt]), idx.astype(jnp.int32))
    b = x.shape[axis] // scale.shape[axis]
    x = _blocks(x, b, axis) * jnp.expand_dims(scale.astype(jnp.float32), axis + 1)
    return x.reshape(codes.shape[:axis] + (x.shape[axis] * b,) + codes.shape[axis + 1:]).astype(dtype)

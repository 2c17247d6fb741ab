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

- w8a8 (inference only): int8 codes with one scale per output column (the absmax over all of its inputs), and
  each matmul quantises its activations to int8 too, one scale per row, and multiplies in integers with int32
  sums (`matmul_w8a8`): the dot products of llama.cpp's q8_0 path and of W8A8 (SmoothQuant without the
  smoothing). A CPU reads a quarter of the float32 bytes and multiplies int8 natively (XLA:CPU turns a float
  matmul of converted int8 weights into a conversion of the whole kernel at every call). Rounding the
  activations has no gradient, so it is not a trainable base.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

FORMATS = ("int8", "int4", "nf4")  # block-wise weight formats (a frozen base can train adapters on them)
W8A8 = "w8a8"
INFERENCE_FORMATS = FORMATS + (W8A8,)

# QLoRA's NormalFloat4 levels (bitsandbytes' table): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)


# The 16 values a 4-bit index stands for (times the block's absmax), ascending.
LEVELS4 = {"nf4": NF4_LEVELS, "int4": ((np.arange(16) - 8) / 7).astype(np.float32)}


def _check(fmt: str):
    if fmt not in INFERENCE_FORMATS:
        raise ValueError(f"quantisation format {fmt!r} is not one of {INFERENCE_FORMATS}")


def _input_axes(axis: int, n_in: int) -> tuple:
    """The contracting axes of a kernel whose last one is `axis` (w8a8's scale covers all of them)."""
    return tuple(range(axis - n_in + 1, axis + 1))


def block_size(dim: int, block: int, where: str = "") -> int:
    """The block used along an axis of `dim` entries: `block`, or the whole axis when it is shorter."""
    b = min(block, dim)
    if b < 1 or dim % b or b % 2:
        raise ValueError(f"{where or 'quantisation'}: an axis of {dim} entries does not split into blocks of {b} "
                         f"(an even number dividing it); set model.overrides.quant_block / peft.quant_block")
    return b


def shapes(shape: tuple, fmt: str, block: int, axis: int, where: str = "",
           n_in: int = 1) -> tuple[tuple, np.dtype, tuple]:
    """`(codes shape, codes dtype, scale shape)` of a kernel of `shape` quantised along `axis` (the last of its
    `n_in` contracting axes)."""
    _check(fmt)
    if fmt == W8A8:
        axes = _input_axes(axis % len(shape), n_in)
        return tuple(shape), np.dtype(np.int8), tuple(1 if i in axes else d for i, d in enumerate(shape))
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


def quantize(w, fmt: str, block: int, axis: int, n_in: int = 1):
    """`(codes, scale)` of the float kernel `w` (see the module docstring); `axis` is the blocked input axis, the
    last of `n_in` contracting axes."""
    _check(fmt)
    axis = axis % w.ndim
    if fmt == W8A8:
        return _absmax_int8(jnp.asarray(w, jnp.float32), _input_axes(axis, n_in))
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
    if fmt == W8A8:
        return (codes.astype(jnp.float32) / 127.0 * scale.astype(jnp.float32)).astype(dtype)
    if fmt == "int8":
        x = codes.astype(jnp.float32) / 127.0
    else:
        idx = jnp.stack([codes & 15, codes >> 4], axis=axis + 1)
        idx = idx.reshape(codes.shape[:axis] + (codes.shape[axis] * 2,) + codes.shape[axis + 1:])
        x = jnp.take(jnp.asarray(LEVELS4[fmt]), idx.astype(jnp.int32))
    b = x.shape[axis] // scale.shape[axis]
    x = _blocks(x, b, axis) * jnp.expand_dims(scale.astype(jnp.float32), axis + 1)
    return x.reshape(codes.shape[:axis] + (x.shape[axis] * b,) + codes.shape[axis + 1:]).astype(dtype)


def _absmax_int8(x, axes):
    """`(round(127 * x / absmax) as int8, absmax)`, the absmax taken over `axes` (kept as size-1 axes)."""
    absmax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    codes = jnp.round(127.0 * x / jnp.where(absmax > 0, absmax, 1.0))
    return jnp.clip(codes, -127, 127).astype(jnp.int8), absmax


def matmul_w8a8(x, codes, scale):
    """`x [M, K] @ dequantize(codes [K, N], scale [N])` in integers: each row of x rounded to int8 against its
    absmax, an int8 x int8 matmul summed in int32, then both scales applied (float32 `[M, N]`)."""
    xq, row_max = _absmax_int8(x.astype(jnp.float32), -1)
    acc = jnp.dot(xq, codes, preferred_element_type=jnp.int32).astype(jnp.float32)
    return acc * (row_max / 127.0) * (scale.astype(jnp.float32) / 127.0)

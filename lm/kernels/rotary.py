"""RoPE in Pallas, fused over the heads of `[B, T, H, D]`, for every convention the families use.

Each convention is a per-dim table: the frequency of dim i (0 for dims past `rotary_dim`, which therefore
pass through), which position component it follows (GLM 2D), and its partner in a rotation pair
(i + rd/2 for rotate-half, i ^ 1 for interleaved). The kernel computes
`out = x * cos(pos * freq) + (x @ P) * sin(pos * freq)` where P is the signed pair permutation
(`(x @ P)[a] = -x[b]`, `(x @ P)[b] = x[a]` for each pair a < b); P is exact in any dtype, and the matmul
keeps the kernel free of lane shuffles that TPU and Triton lower differently. Since P is antisymmetric
and each pair shares its angle, the gradient is the same kernel with the sine negated.

Rows are the `T * H` (token, head) pairs of a batch row, so a tile is 2D `[rows, Dp]` on every target.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from lm.kernels import common
from lm.kernels.reference import RopeScaling, rope_frequencies

f32 = jnp.float32
BLOCK_ROWS = 256


@dataclasses.dataclass(frozen=True)
class _Static:
    theta: float
    rotary_dim: int
    interleaved: bool
    two_d: bool
    interpret: Optional[bool]
    scaling: Optional[RopeScaling] = None
    factor: float = 1.0
    sign: float = 1.0
    target: str = "interpret"


def _pairs(rd: int, interleaved: bool, offset: int = 0):
    """(first, second) dims of each rotation pair of a `rd`-dim rotary block, and the frequency index."""
    half = rd // 2
    idx = np.arange(half)
    if interleaved:
        return offset + 2 * idx, offset + 2 * idx + 1, idx
    return offset + idx, offset + half + idx, idx


def _tables(c: _Static, dp: int, dtype):
    """freq [1, Dp] f32, component [1, Dp] f32 (2D only), the signed permutation P [Dp, Dp] and the cos/sin
    factor (a Python float)."""
    blocks = [(0, c.rotary_dim, 0)] if not c.two_d else [(0, c.rotary_dim // 2, 0),
                                                          (c.rotary_dim // 2, c.rotary_dim // 2, 1)]
    freq, comp = jnp.zeros((dp,), f32), np.zeros((dp,), np.float32)
    perm = np.zeros((dp, dp), np.float32)
    factor = 1.0
    for offset, rd, component in blocks:
        # The reference's frequencies, so the angles match bit for bit.
        inv_freq, factor = rope_frequencies(rd, c.theta, c.scaling)
        first, second, k = _pairs(rd, c.interleaved, offset)
        freq = freq.at[first].set(inv_freq[k]).at[second].set(inv_freq[k])
        comp[first], comp[second] = component, component
        perm[second, first], perm[first, second] = -1.0, 1.0
    return freq[None], jnp.asarray(comp)[None], jnp.asarray(perm, dtype), factor


def _kernel(x_ref, pos_ref, *refs, c: _Static):
    if c.two_d:
        pos2_ref, comp_ref, freq_ref, perm_ref, o_ref = refs
    else:
        freq_ref, perm_ref, o_ref = refs
    x = x_ref[...]
    pos = pos_ref[...]
    if c.two_d:
        pos = jnp.where(comp_ref[...] > 0.5, pos2_ref[...], pos)
    angle = pos * freq_ref[...]
    rotated = lax.dot_general(x, perm_ref[...], (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                              preferred_element_type=f32)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    if c.factor != 1.0:  # yarn's attention factor scales cos and sin, as in the reference
        cos, sin = cos * c.factor, sin * c.factor
    out = x.astype(f32) * cos + rotated * (c.sign * sin)
    o_ref[...] = out.astype(o_ref.dtype)


def _call(c: _Static, x3, pos, *rest):
    batch, n_rows, dp = x3.shape
    br = min(BLOCK_ROWS, n_rows)
    row = lambda width: pl.BlockSpec((None, br, width), lambda b, i: (b, i, 0))  # noqa: E731
    full = lambda a: pl.BlockSpec(a.shape, lambda b, i: (0,) * a.ndim)  # noqa: E731
    specs = [row(dp), row(1)] + ([row(1), full(rest[1])] if c.two_d else []) + [full(rest[-2]), full(rest[-1])]
    return pl.pallas_call(
        functools.partial(_kernel, c=c),
        grid=(batch, n_rows // br),
        in_specs=specs,
        out_specs=row(dp),
        out_shape=jax.ShapeDtypeStruct(x3.shape, x3.dtype),
        compiler_params=common.compiler_params(c.target, ("parallel", "parallel")),
        interpret=c.target == "interpret",
        name="rope",
    )(x3, pos, *rest)


def _apply(c: _Static, x, positions):
    b, t, h, d = x.shape
    dp, n = common.padded_dim(d), t * h
    br = min(BLOCK_ROWS, max(common.MIN_TILE, pl.next_power_of_2(n)))
    n_pad = common.round_up(n, br)
    x3 = common.pad_axis(common.pad_axis(x.reshape(b, n, d), 2, dp), 1, n_pad)

    def rows(p):  # [B, T] positions -> one per (token, head) row, [B, n_pad, 1] float32
        p = jnp.broadcast_to(p.astype(f32)[:, :, None], (b, t, h)).reshape(b, n, 1)
        return common.pad_axis(p, 1, n_pad)

    freq, comp, perm, factor = _tables(c, dp, x.dtype)
    c = dataclasses.replace(c, factor=factor)
    args = [rows(positions[..., 0]), rows(positions[..., 1]), comp] if c.two_d else [rows(positions)]
    out = common.dispatch(lambda tg: functools.partial(_call, dataclasses.replace(c, target=tg)),
                          x3, *args, freq, perm, interpret=c.interpret)
    return out[:, :n, :d].reshape(b, t, h, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rope(c: _Static, x, positions):
    return _apply(c, x, positions)


def _rope_fwd(c, x, positions):
    return _apply(c, x, positions), positions


def _rope_bwd(c, positions, dy):
    return _apply(dataclasses.replace(c, sign=-c.sign), dy, positions), None


_rope.defvjp(_rope_fwd, _rope_bwd)


def rope(x, positions, *, theta: float = 10000.0, rotary_dim: Optional[int] = None, interleaved: bool = False,
         scaling: Optional[RopeScaling] = None, interpret=None):
    """Pallas RoPE; same arguments and result as `reference.rope`, differentiable in x."""
    where = "lm.kernels.rope"
    if x.ndim != 4:
        raise ValueError(f"{where}: x must be [B, T, H, D], got {x.shape}")
    b, t, _, d = x.shape
    rd = d if rotary_dim is None else int(rotary_dim)
    two_d = positions.ndim == 3
    if positions.shape[:2] != (b, t) or (two_d and positions.shape[2] != 2) or positions.ndim not in (2, 3):
        raise ValueError(f"{where}: positions must be [B, T]={(b, t)} or [B, T, 2], got {positions.shape}")
    if not 0 < rd <= d or rd % (4 if two_d else 2):
        raise ValueError(f"{where}: rotary_dim={rd} must be in (0, {d}] and split into pairs"
                         f"{' within each half (2D positions)' if two_d else ''}")
    if scaling is not None and two_d:
        raise ValueError(f"{where}: RoPE scaling is not defined for 2D positions")
    c = _Static(theta=float(theta), rotary_dim=rd, interleaved=bool(interleaved), two_d=two_d, interpret=interpret,
                scaling=scaling)
    return _rope(c, x, positions)

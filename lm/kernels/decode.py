"""Decode attention in Pallas: one new query token per row against a KV cache, split-K over the cache.

`q: [B, Hq, D]`, caches `[B, Hkv, S, D]` (read in place, never transposed), `lengths: [B]`. The cache is cut
into `n_splits` chunks; a program owns (row, K/V heads, chunk) and walks that chunk in `block_k` tiles up
to the row's length only (chunks past it do no work); with a sliding window it starts at the first tile
holding a key inside the window (chunks wholly before it do no work either). The g = Hq // Hkv query
heads of a group are the rows of one `[g, D]` tile (padded to 16 rows for Triton's matmul), so a K/V tile
is loaded once per group. Soft-capping (Gemma2) bends the logits before ALiBi and the mask.
Each chunk returns an unnormalised partial result with its running max and sum; a log-sum-exp merge over
the chunks gives the output. TPU programs take all K/V heads of a row, GPU programs one head; either way a
block's last two dims are `(split_len, D)`.
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

from lm.kernels import common, reference
from lm.kernels.common import MASKED, MAX_INIT

f32 = jnp.float32
MAX_SPLITS = 16


@dataclasses.dataclass(frozen=True)
class _Static:
    sm_scale: float
    block_k: int
    split_len: int
    group_rows: int
    heads_per_program: int
    has_alibi: bool
    has_window: bool
    softcap: Optional[float]
    target: str = "interpret"


def _kernel(len_ref, q_ref, k_ref, v_ref, *refs, c: _Static):
    refs = list(refs)
    window_ref = refs.pop(0) if c.has_window else None
    slope_ref = refs.pop(0) if c.has_alibi else None
    acc_ref, m_ref, l_ref = refs
    b, chunk = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]
    start = chunk * c.split_len
    n_blocks = lax.div(jnp.clip(length - start, 0, c.split_len) + (c.block_k - 1), c.block_k)
    first_block = 0
    if c.has_window:  # the query sits at length - 1 and sees keys j > length - 1 - window
        lo = jnp.maximum(length - window_ref[0], 0)
        first_block = lax.div(jnp.clip(lo - start, 0, c.split_len), c.block_k)
    shape = (c.group_rows, c.block_k)
    for h in range(c.heads_per_program):  # static: K/V heads in this program's block
        q = q_ref[h]
        slope = slope_ref[h] if c.has_alibi else None

        def step(jb, carry, h=h, q=q, slope=slope):
            acc, m, l = carry
            rows = pl.ds(pl.multiple_of(jb * c.block_k, c.block_k), c.block_k)
            k, v = k_ref[h, rows, :], v_ref[h, rows, :]
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=f32) * c.sm_scale
            s = reference.softcap(s, c.softcap)
            cols = start + jb * c.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
            if c.has_alibi:
                s = s + slope * (cols - (length - 1)).astype(f32)
            visible = cols < length
            if c.has_window:
                visible = visible & (cols >= lo)
            s = jnp.where(visible, s, MASKED)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new)
            acc = alpha * acc + lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                preferred_element_type=f32)
            return acc, m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True)

        init = (jnp.zeros((c.group_rows, q.shape[-1]), f32), jnp.full((c.group_rows, 1), MAX_INIT, f32),
                jnp.zeros((c.group_rows, 1), f32))
        acc, m, l = lax.fori_loop(first_block, n_blocks, step, init)
        acc_ref[h] = acc
        m_ref[h] = m
        l_ref[h] = l


def _call(c: _Static, lengths, q4, k, v, *extras):
    batch, hkv, s_len, dp = k.shape
    hp, rows, n_splits = c.heads_per_program, c.group_rows, s_len // c.split_len
    kv = pl.BlockSpec((None, hp, c.split_len, dp), lambda b, h, s: (b, h, s, 0))
    q_spec = pl.BlockSpec((None, hp, rows, dp), lambda b, h, s: (b, h, 0, 0))
    in_specs = [common.scalar_spec(c.target), q_spec, kv, kv]
    if c.has_window:
        in_specs.append(common.scalar_spec(c.target))
    if c.has_alibi:
        in_specs.append(pl.BlockSpec((hp, rows, 1), lambda b, h, s: (h, 0, 0)))
    part = lambda width: pl.BlockSpec((None, hp, None, rows, width), lambda b, h, s: (b, h, s, 0, 0))  # noqa: E731
    out_shape = [jax.ShapeDtypeStruct((batch, hkv, n_splits, rows, w), f32) for w in (dp, 1, 1)]
    return pl.pallas_call(
        functools.partial(_kernel, c=c),
        grid=(batch, hkv // hp, n_splits),
        in_specs=in_specs,
        out_specs=[part(dp), part(1), part(1)],
        out_shape=out_shape,
        compiler_params=common.compiler_params(c.target, ("parallel",) * 3),
        interpret=c.target == "interpret",
        name="decode_attention",
    )(lengths, q4, k, v, *extras)


def _block_and_splits(s_len: int, block_k: int):
    """Largest power-of-two tile <= block_k dividing S (or None: pad S), and a split count dividing the tiles."""
    bk = common.tile(s_len, block_k, "block_k")
    while bk >= common.MIN_TILE and s_len % bk:
        bk //= 2
    if bk < common.MIN_TILE:
        return None, None
    n_blocks = s_len // bk
    n_splits = max(d for d in range(1, min(n_blocks, MAX_SPLITS) + 1) if n_blocks % d == 0)
    return bk, n_splits


def decode_attention(q, k_cache, v_cache, lengths, *, alibi_slopes=None, sm_scale: Optional[float] = None,
                     window=None, softcap: Optional[float] = None, block_k: int = 128, interpret=None,
                     heads_per_program: Optional[int] = None):
    """Pallas decode attention; same arguments and result as `reference.decode_attention` (not differentiable;
    a row of length 0 gives zeros; window may be traced, softcap is static).

    A head dim that is not a power of two >= 16, or a cache length with no power-of-two tile >= 16
    dividing it, is padded here (a copy of the cache); `heads_per_program` overrides the per-target choice
    of K/V heads per program (all on TPU, one on GPU / in interpret mode), so tests can run either layout.
    """
    _check(q, k_cache, v_cache, lengths, alibi_slopes, window)
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    g, dp = hq // hkv, common.padded_dim(d)
    rows = max(common.MIN_TILE, pl.next_power_of_2(g))
    bk, n_splits = _block_and_splits(k_cache.shape[2], block_k)
    if bk is None:  # no tile divides S: pad the cache to whole tiles (padded keys are past every length)
        bk = common.tile(k_cache.shape[2], block_k, "block_k")
        k_cache = common.pad_axis(k_cache, 2, common.round_up(k_cache.shape[2], bk))
        v_cache = common.pad_axis(v_cache, 2, k_cache.shape[2])
        bk, n_splits = _block_and_splits(k_cache.shape[2], bk)
    k_cache, v_cache = common.pad_axis(k_cache, 3, dp), common.pad_axis(v_cache, 3, dp)
    q4 = common.pad_axis(common.pad_axis(q.reshape(b, hkv, g, d), 2, rows), 3, dp)
    extras = []
    if window is not None:
        extras.append(jnp.asarray(window, jnp.int32).reshape(1))
    if alibi_slopes is not None:
        extras.append(common.pad_axis(alibi_slopes.astype(f32).reshape(hkv, g), 1, rows)[..., None])
    base = _Static(sm_scale=float(d ** -0.5 if sm_scale is None else sm_scale), block_k=bk,
                   split_len=k_cache.shape[2] // n_splits, group_rows=rows, heads_per_program=1,
                   has_alibi=alibi_slopes is not None, has_window=window is not None,
                   softcap=None if softcap is None else float(softcap))

    def build(target):
        hp = heads_per_program or (hkv if target == "tpu" else 1)
        if hkv % hp:
            raise ValueError(f"heads_per_program={hp} must divide the {hkv} K/V heads")
        return functools.partial(_call, dataclasses.replace(base, target=target, heads_per_program=hp))

    acc, m, l = common.dispatch(build, lengths.astype(jnp.int32), q4, k_cache, v_cache, *extras,
                                interpret=interpret)
    # Merge the chunks: weights exp(m_chunk - m_max) rescale each partial sum to a common max.
    w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))
    total = jnp.sum(w * l, axis=2)
    out = jnp.sum(w * acc, axis=2) / jnp.where(total == 0.0, 1.0, total)
    return out[:, :, :g, :d].reshape(b, hq, d).astype(q.dtype)


def _check(q, k_cache, v_cache, lengths, slopes, window):
    where = "lm.kernels.decode_attention"
    if q.ndim != 3 or k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"{where}: want q [B, Hq, D] and caches [B, Hkv, S, D]; got q {q.shape}, "
                         f"k_cache {k_cache.shape}, v_cache {v_cache.shape}")
    b, hq, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d or hq % k_cache.shape[1]:
        raise ValueError(f"{where}: caches {k_cache.shape} do not fit q {q.shape} (same B and D, Hq a "
                         "multiple of Hkv)")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"{where}: q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    if lengths.shape != (b,):
        raise ValueError(f"{where}: lengths must be [B]={b}, got {np.shape(lengths)}")
    if slopes is not None and slopes.shape != (hq,):
        raise ValueError(f"{where}: alibi_slopes must be [Hq]={hq}, got {slopes.shape}")
    if window is not None and jnp.ndim(window) != 0:
        raise ValueError(f"{where}: window must be a scalar (int or int32 []), got shape {jnp.shape(window)}")

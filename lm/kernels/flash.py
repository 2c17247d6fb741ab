"""Flash attention in Pallas: online-softmax forward, dQ and dK/dV backward kernels under `jax.custom_vjp`.

Layout: heads move in front of the sequence and the sequence is cut into blocks, `[B, H, n_blocks, block, Dp]`
(Dp = head dim padded to a power of two >= 16). A program owns one query block (forward, dQ) or one key
block (dK/dV) and loops over the other side's blocks inside the kernel, indexing only the leading,
untiled block axis; so the same kernel meets TPU's (8, 128) rule and Triton's power-of-two tiles.

Masks are built in the kernel from indices: causal, GLM prefix-LM (`prefix_len[b]` keys visible to
every query), sliding window (query i sees keys j > i - window), packed `segment_ids`, and key padding;
ALiBi adds `slope[h] * (j - i)` from the slopes, after Gemma2's soft-capping `cap * tanh(s / cap)`.
The loops visit only blocks with a visible key (causal, prefix and window bounds; with segment ids a block
whose id range misses the query block's is skipped), and blocks known to be fully visible skip the mask
(with a window every visited block is masked: the window's edge moves with the query row). Those rules
live in `flash_masks`.
GQA: query head h reads K/V head h // (Hq // Hkv); the dK/dV program of a K/V head sums its query heads.
On TPU the looped-over side of a (row, head) sits whole in VMEM: fine to a few thousand tokens; longer
sequences would want that loop moved onto the grid with scratch accumulators (Triton has no scratch).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lm.kernels import common
from lm.kernels.common import LSE_EMPTY, MAX_INIT
from lm.kernels.flash_masks import (Extras, Static, key_range, logits, needs_mask, nt_dot, overlap, query_range,
                                    softcap_grad)

f32 = jnp.float32
BWD_LOOP_BLOCK = 32  # GPU backward: block size of the side each kernel loops over
# GPU: largest `block x Dp` tile in bytes. Triton keeps the owned tile plus two pipelined stages of the
# looped-over tiles in shared memory (227 KiB on H100); f32 at D=128 with 128-row blocks asks for 256 KiB.
GPU_TILE_BYTES = 32 * 1024


def gpu_block_cap(head_dim: int, itemsize: int) -> int:
    """Off TPU: the largest block (a power of two >= 16) whose `[block, Dp]` tile fits GPU_TILE_BYTES."""
    cap = 16
    while cap * 2 * common.padded_dim(head_dim) * itemsize <= GPU_TILE_BYTES:
        cap *= 2
    return cap


def _tn_dot(a, b):
    """a.T @ b with float32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=f32)


def _loop(lo, hi, body, carry, skip_test=None):
    """fori_loop over [lo, hi) whose body is skipped where `skip_test(i)` is False."""
    if skip_test is None:
        return lax.fori_loop(lo, hi, body, carry)
    return lax.fori_loop(lo, hi, lambda i, cr: lax.cond(skip_test(i), lambda: body(i, cr), lambda: cr), carry)


# ----------------------------------------------------------------------------------------------- forward

def _fwd_kernel(q_ref, k_ref, v_ref, *refs, c: Static):
    *ins, o_ref, lse_ref = refs
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ex = Extras(c, ins, b)
    slope = ex.slopes[h] if c.has_alibi else None
    qseg = ex.qseg[...] if c.has_segments else None
    q = q_ref[...]
    bq = c.block_q

    def body(masked):
        def step(kb, carry):
            acc, m, l = carry
            kseg = ex.kseg[kb] if c.has_segments else None
            s, _ = logits(c, q, k_ref[kb], i * bq, kb * c.block_k, slope, qseg, kseg, ex, masked)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new)
            v = v_ref[kb]
            acc = alpha * acc + lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                preferred_element_type=f32)
            return acc, m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True)
        return step

    carry = (jnp.zeros((bq, c.dp), f32), jnp.full((bq, 1), MAX_INIT, f32), jnp.zeros((bq, 1), f32))
    start, full, end = key_range(c, i, ex)
    carry = _loop(start, full, body(False), carry)
    if needs_mask(c):
        skip = (lambda kb: overlap(qseg, ex.kseg[kb])) if c.has_segments else None
        carry = _loop(full, end, body(True), carry, skip)
    acc, m, l = carry
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, LSE_EMPTY, m + jnp.log(l_safe))


def _extra_specs(c: Static, qseg_map, kseg_map, q_side_full: bool):
    specs = []
    if c.has_segments:
        if q_side_full:
            specs.append(pl.BlockSpec((None, c.nq, c.block_q, 1), qseg_map))
            specs.append(pl.BlockSpec((None, None, 1, c.block_k), kseg_map))
        else:
            specs.append(pl.BlockSpec((None, None, c.block_q, 1), qseg_map))
            specs.append(pl.BlockSpec((None, c.nk, 1, c.block_k), kseg_map))
    if c.has_prefix:
        specs.append(common.scalar_spec(c.target))
    if c.has_window:
        specs.append(common.scalar_spec(c.target))
    if c.has_alibi:
        specs.append(common.scalar_spec(c.target))
    return specs


def _q_block_specs(c: Static):
    """Specs of the query-block-owning kernels (forward, dQ): grid (B, Hq, nq)."""
    g = c.groups
    q = pl.BlockSpec((None, None, None, c.block_q, c.dp), lambda b, h, i: (b, h, i, 0, 0))
    row = pl.BlockSpec((None, None, None, c.block_q, 1), lambda b, h, i: (b, h, i, 0, 0))
    kv = pl.BlockSpec((None, None, c.nk, c.block_k, c.dp), lambda b, h, i: (b, lax.div(h, g), 0, 0, 0))
    extras = _extra_specs(c, lambda b, h, i: (b, i, 0, 0), lambda b, h, i: (b, 0, 0, 0), q_side_full=False)
    return q, row, kv, extras


def _warps(c: Static) -> int:
    return 4 if c.dp <= 64 else 8


def _forward_call(c: Static, q5, k5, v5, *extras):
    """Output and log-sum-exp in `c`'s blocks; off TPU computed with blocks cut to fit shared memory."""
    if c.target == "tpu":
        return _forward_blocks(c, q5, k5, v5, *extras)
    cap = gpu_block_cap(c.head_dim, q5.dtype.itemsize)
    cs = c.reblocked(cap, cap)
    o5, lse = _forward_blocks(cs, _view(q5, cs.block_q), _view(k5, cs.block_k), _view(v5, cs.block_k),
                              *_view_extras(cs, extras))
    return _view(o5, c.block_q), _view(lse, c.block_q)


def _forward_blocks(c: Static, q5, k5, v5, *extras):
    batch, hq = q5.shape[:2]
    q, row, kv, extra_specs = _q_block_specs(c)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, c=c),
        grid=(batch, hq, c.nq),
        in_specs=[q, kv, kv, *extra_specs],
        out_specs=[q, row],
        out_shape=[jax.ShapeDtypeStruct(q5.shape, q5.dtype),
                   jax.ShapeDtypeStruct(q5.shape[:-1] + (1,), f32)],
        compiler_params=common.compiler_params(c.target, ("parallel",) * 3, num_warps=_warps(c)),
        interpret=c.target == "interpret",
        name="flash_attention_fwd",
    )(q5, k5, v5, *extras)


# ---------------------------------------------------------------------------------------------- backward

def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, c: Static):
    *ins, dq_ref = refs
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ex = Extras(c, ins, b)
    slope = ex.slopes[h] if c.has_alibi else None
    qseg = ex.qseg[...] if c.has_segments else None
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def body(masked):
        def step(kb, dq):
            k, v = k_ref[kb], v_ref[kb]
            kseg = ex.kseg[kb] if c.has_segments else None
            s, t = logits(c, q, k, i * c.block_q, kb * c.block_k, slope, qseg, kseg, ex, masked)
            p = jnp.exp(s - lse)
            ds = softcap_grad(t, p * (nt_dot(do, v) - delta))
            return dq + lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                        preferred_element_type=f32)
        return step

    dq = jnp.zeros((c.block_q, c.dp), f32)
    start, full, end = key_range(c, i, ex)
    dq = _loop(start, full, body(False), dq)
    if needs_mask(c):
        skip = (lambda kb: overlap(qseg, ex.kseg[kb])) if c.has_segments else None
        dq = _loop(full, end, body(True), dq, skip)
    dq_ref[...] = (dq * c.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, c: Static):
    *ins, dk_ref, dv_ref = refs
    b, hk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ex = Extras(c, ins, b)
    kseg = ex.kseg[...] if c.has_segments else None
    k, v = k_ref[...], v_ref[...]

    def head(hi, carry):
        slope = ex.slopes[hk * c.groups + hi] if c.has_alibi else None

        def body(masked):
            def step(qb, carry):
                dk, dv = carry
                q, do = q_ref[hi, qb], do_ref[hi, qb]
                qseg = ex.qseg[qb] if c.has_segments else None
                s, t = logits(c, q, k, qb * c.block_q, j * c.block_k, slope, qseg, kseg, ex, masked)
                p = jnp.exp(s - lse_ref[hi, qb])
                dv = dv + _tn_dot(p.astype(do.dtype), do)
                ds = softcap_grad(t, p * (nt_dot(do, v) - delta_ref[hi, qb]))
                return dk + _tn_dot(ds.astype(q.dtype), q), dv
            return step

        start, full, end = query_range(c, j, ex)
        if needs_mask(c):
            skip = (lambda qb: overlap(ex.qseg[qb], kseg)) if c.has_segments else None
            carry = _loop(start, full, body(True), carry, skip)
        return _loop(full, end, body(False), carry)

    zeros = jnp.zeros((c.block_k, c.dp), f32)
    dk, dv = lax.fori_loop(0, c.groups, head, (zeros, zeros))
    dk_ref[...] = (dk * c.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _view(x5, block: int):
    """`[B, H, n, blk, w]` viewed with another block size along the sequence."""
    b, h, n, blk, w = x5.shape
    return x5.reshape(b, h, n * blk // block, block, w)


def _view_extras(c: Static, extras):
    """Segment ids re-cut for the blocks of `c` (prefix lengths, window and slopes pass through)."""
    if not c.has_segments:
        return list(extras)
    qseg, kseg, *rest = extras
    b = qseg.shape[0]
    return [qseg.reshape(b, c.nq, c.block_q, 1), kseg.reshape(b, c.nk, 1, c.block_k), *rest]


def _backward_call(c: Static, q5, k5, v5, do5, lse, delta, *extras):
    """dQ, dK, dV in `c`'s blocks. Off TPU the side each kernel loops over uses short blocks (32), as Triton's
    own flash backward does, to keep the owned accumulators in registers, and the owned side is cut to fit
    shared memory (`gpu_block_cap`); TPU keeps the forward blocks."""
    if c.target == "tpu":
        args = (q5, k5, v5, do5, lse, delta, *extras)
        return _dq_call(c, *args), *_dkv_call(c, *args)
    cap = gpu_block_cap(c.head_dim, q5.dtype.itemsize)
    cq, ckv = c.reblocked(cap, BWD_LOOP_BLOCK), c.reblocked(BWD_LOOP_BLOCK, cap)
    qs = [_view(x, cq.block_q) for x in (q5, do5, lse, delta)]
    dq = _dq_call(cq, qs[0], _view(k5, cq.block_k), _view(v5, cq.block_k), *qs[1:], *_view_extras(cq, extras))
    qs = [_view(x, ckv.block_q) for x in (q5, do5, lse, delta)]
    ks = [_view(x, ckv.block_k) for x in (k5, v5)]
    dk, dv = _dkv_call(ckv, qs[0], *ks, *qs[1:], *_view_extras(ckv, extras))
    return _view(dq, c.block_q), _view(dk, c.block_k), _view(dv, c.block_k)


def _dq_call(c: Static, q5, k5, v5, do5, lse, delta, *extras):
    batch, hq = q5.shape[:2]
    q, row, kv, extra_specs = _q_block_specs(c)
    return pl.pallas_call(
        functools.partial(_dq_kernel, c=c),
        grid=(batch, hq, c.nq),
        in_specs=[q, kv, kv, q, row, row, *extra_specs],
        out_specs=q,
        out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
        compiler_params=common.compiler_params(c.target, ("parallel",) * 3, num_warps=_warps(c)),
        interpret=c.target == "interpret",
        name="flash_attention_dq",
    )(q5, k5, v5, do5, lse, delta, *extras)


def _dkv_call(c: Static, q5, k5, v5, do5, lse, delta, *extras):
    batch, hkv = k5.shape[:2]
    g = c.groups
    qg = pl.BlockSpec((None, g, c.nq, c.block_q, c.dp), lambda b, h, j: (b, h, 0, 0, 0))
    rowg = pl.BlockSpec((None, g, c.nq, c.block_q, 1), lambda b, h, j: (b, h, 0, 0, 0))
    kvb = pl.BlockSpec((None, None, None, c.block_k, c.dp), lambda b, h, j: (b, h, j, 0, 0))
    extra_specs = _extra_specs(c, lambda b, h, j: (b, 0, 0, 0), lambda b, h, j: (b, j, 0, 0), q_side_full=True)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, c=c),
        grid=(batch, hkv, c.nk),
        in_specs=[qg, kvb, kvb, qg, rowg, rowg, *extra_specs],
        out_specs=[kvb, kvb],
        out_shape=[jax.ShapeDtypeStruct(k5.shape, k5.dtype), jax.ShapeDtypeStruct(v5.shape, v5.dtype)],
        compiler_params=common.compiler_params(c.target, ("parallel",) * 3, num_warps=_warps(c)),
        interpret=c.target == "interpret",
        name="flash_attention_dkv",
    )(q5, k5, v5, do5, lse, delta, *extras)


# ------------------------------------------------------------------------------------------ layout + VJP

def _to_blocks(x, length: int, block: int, dp: int):
    """`[B, L, H, D]` -> `[B, H, length / block, block, Dp]` (zero padded to `length` and `Dp`)."""
    b, _, h, _ = x.shape
    x = common.pad_axis(common.pad_axis(x.transpose(0, 2, 1, 3), 2, length), 3, dp)
    return x.reshape(b, h, length // block, block, dp)


def _from_blocks(x5, length: int, d: int):
    """`[B, H, n_blocks, block, Dp]` -> `[B, L, H, D]`."""
    b, h, nb, blk, dp = x5.shape
    return x5.reshape(b, h, nb * blk, dp)[:, :, :length, :d].transpose(0, 2, 1, 3)


def _rows(x, c: Static):
    """Per-row float `[B, T, H]` -> `[B, H, nq, bq, 1]`."""
    return _to_blocks(x[..., None], c.len_q, c.block_q, 1)


def _extras(c: Static, prefix_len, slopes, segment_ids, window):
    out = []
    if c.has_segments:
        seg = segment_ids.astype(jnp.int32)
        out.append(common.pad_axis(seg, 1, c.len_q, -1).reshape(seg.shape[0], c.nq, c.block_q, 1))
        out.append(common.pad_axis(seg, 1, c.len_k, -1).reshape(seg.shape[0], c.nk, 1, c.block_k))
    if c.has_prefix:
        out.append(prefix_len.astype(jnp.int32))
    if c.has_window:
        out.append(jnp.asarray(window, jnp.int32).reshape(1))
    if c.has_alibi:
        out.append(slopes.astype(f32))
    return out


def _run(c: Static, call, *args):
    return common.dispatch(lambda t: functools.partial(call, dataclasses.replace(c, target=t)), *args,
                           interpret=c.interpret)


def _forward(c: Static, q, k, v, prefix_len, slopes, segment_ids, window):
    q5 = _to_blocks(q, c.len_q, c.block_q, c.dp)
    k5 = _to_blocks(k, c.len_k, c.block_k, c.dp)
    v5 = _to_blocks(v, c.len_k, c.block_k, c.dp)
    extras = _extras(c, prefix_len, slopes, segment_ids, window)
    o5, lse = _run(c, _forward_call, q5, k5, v5, *extras)
    return _from_blocks(o5, c.seq_q, c.head_dim), (q5, k5, v5, extras, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(c: Static, q, k, v, prefix_len, slopes, segment_ids, window):
    return _forward(c, q, k, v, prefix_len, slopes, segment_ids, window)[0]


def _flash_fwd(c, q, k, v, prefix_len, slopes, segment_ids, window):
    out, (q5, k5, v5, extras, lse) = _forward(c, q, k, v, prefix_len, slopes, segment_ids, window)
    return out, (q5, k5, v5, extras, lse, out)


def _flash_bwd(c, res, dout):
    q5, k5, v5, extras, lse, out = res
    delta = jnp.sum(out.astype(f32) * dout.astype(f32), axis=-1)  # [B, T, Hq]: rowsum(dO * O)
    do5 = _to_blocks(dout, c.len_q, c.block_q, c.dp)
    dq5, dk5, dv5 = _run(c, _backward_call, q5, k5, v5, do5, lse, _rows(delta, c), *extras)
    return (_from_blocks(dq5, c.seq_q, c.head_dim), _from_blocks(dk5, c.seq_k, c.head_dim),
            _from_blocks(dv5, c.seq_k, c.head_dim), None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, causal: bool = True, prefix_len=None, alibi_slopes=None, segment_ids=None,
                    sm_scale: Optional[float] = None, window=None, softcap: Optional[float] = None,
                    block_q: int = 128, block_k: int = 128, interpret=None):
    """Pallas flash attention `[B, T, Hq, D] x [B, S, Hkv, D] -> [B, T, Hq, D]`, differentiable in q, k, v.

    Same arguments and results as `reference.flash_attention` (window may be traced; softcap is static);
    block_q / block_k (powers of two >= 16) are upper bounds, shrunk for short sequences. Rows that can see
    no key at all give zeros.
    """
    _check(q, k, v, prefix_len, alibi_slopes, segment_ids, window, causal)
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    bq, bk = common.tile(t, block_q, "block_q"), common.tile(s, block_k, "block_k")
    c = Static(causal=bool(causal), sm_scale=float(d ** -0.5 if sm_scale is None else sm_scale), block_q=bq,
               block_k=bk, seq_q=t, seq_k=s, len_q=common.round_up(t, bq), len_k=common.round_up(s, bk),
               head_dim=d, groups=hq // hkv, has_prefix=bool(causal) and prefix_len is not None,
               has_alibi=alibi_slopes is not None, has_segments=segment_ids is not None,
               has_window=window is not None, softcap=None if softcap is None else float(softcap),
               interpret=interpret)
    return _flash(c, q, k, v, prefix_len, alibi_slopes, segment_ids, window)


def _check(q, k, v, prefix_len, slopes, segment_ids, window, causal):
    where = "lm.kernels.flash_attention"
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"{where}: want q [B, T, Hq, D] and k, v [B, S, Hkv, D]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    b, t, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or hq % k.shape[2]:
        raise ValueError(f"{where}: k/v {k.shape} do not fit q {q.shape} (same B and D, Hq a multiple of Hkv)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{where}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if prefix_len is not None and prefix_len.shape != (b,):
        raise ValueError(f"{where}: prefix_len must be [B]={b}, got {prefix_len.shape}")
    if slopes is not None and slopes.shape != (hq,):
        raise ValueError(f"{where}: alibi_slopes must be [Hq]={hq}, got {slopes.shape}")
    if segment_ids is not None and (segment_ids.shape != (b, t) or k.shape[1] != t):
        raise ValueError(f"{where}: segment_ids must be [B, T]={(b, t)} with S == T; got {segment_ids.shape}, "
                         f"S={k.shape[1]}")
    if window is not None and jnp.ndim(window) != 0:
        raise ValueError(f"{where}: window must be a scalar (int or int32 []), got shape {jnp.shape(window)}")
    if window is not None and causal and prefix_len is not None:
        raise ValueError(f"{where}: a sliding window with a prefix-LM prefix_len is not supported")

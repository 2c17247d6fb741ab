"""Flash attention in Pallas: online-softmax forward, dQ and dK/dV backward kernels under `jax.custom_vjp`.

Layout: heads move in front of the sequence and the sequence is cut into blocks, `[B, H, n_blocks, block, Dp]`
(Dp = head dim padded to a power of two >= 16). A program owns one query block (forward, dQ) or one key
block (dK/dV) and loops over the other side's blocks inside the kernel, indexing only the leading,
untiled block axis; so the same kernel meets TPU's (8, 128) rule and Triton's power-of-two tiles.

Masks are built in the kernel from indices: causal, GLM prefix-LM (`prefix_len[b]` keys visible to
every query), packed `segment_ids`, and key padding; ALiBi adds `slope[h] * (j - i)` from the slopes.
The loops visit only blocks with a visible key (causal and prefix bounds; with segment ids a block whose
id range misses the query block's is skipped), and blocks known to be fully visible skip the mask.
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
from lm.kernels.common import LSE_EMPTY, MASKED, MAX_INIT

f32 = jnp.float32
BWD_LOOP_BLOCK = 32  # GPU backward: block size of the side each kernel loops over
# GPU: largest `block x Dp` tile in bytes. Triton keeps the owned tile plus two pipelined stages of the
# looped-over tiles in shared memory (227 KiB on H100); f32 at D=128 with 128-row blocks asks for 256 KiB.
GPU_TILE_BYTES = 32 * 1024


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable: it is a nondiff argument of the custom VJP).

    seq_q / seq_k are the true lengths, len_q / len_k the padded ones (multiples of every block size used).
    """
    causal: bool
    sm_scale: float
    block_q: int
    block_k: int
    seq_q: int
    seq_k: int
    len_q: int
    len_k: int
    head_dim: int
    groups: int
    has_prefix: bool
    has_alibi: bool
    has_segments: bool
    interpret: Optional[bool]
    target: str = "interpret"

    @property
    def dp(self):
        return common.padded_dim(self.head_dim)

    @property
    def nq(self):
        return self.len_q // self.block_q

    @property
    def nk(self):
        return self.len_k // self.block_k

    @property
    def key_padding(self):
        return self.seq_k % self.block_k != 0

    def reblocked(self, block_q: int, block_k: int) -> "_Static":
        """The same arrays viewed with smaller blocks (sizes that divide the current ones)."""
        return dataclasses.replace(self, block_q=min(block_q, self.block_q), block_k=min(block_k, self.block_k))


def gpu_block_cap(head_dim: int, itemsize: int) -> int:
    """Off TPU: the largest block (a power of two >= 16) whose `[block, Dp]` tile fits GPU_TILE_BYTES."""
    cap = 16
    while cap * 2 * common.padded_dim(head_dim) * itemsize <= GPU_TILE_BYTES:
        cap *= 2
    return cap


def _cdiv(a, b: int):
    return lax.div(a + (b - 1), b)


def _nt_dot(a, b):
    """a @ b.T with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=f32)


def _tn_dot(a, b):
    """a.T @ b with float32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=f32)


class _Extras:
    """The optional inputs' refs of a program: segment ids, prefix length and ALiBi slope."""

    def __init__(self, c: _Static, refs, batch):
        refs = list(refs)
        self.qseg = refs.pop(0) if c.has_segments else None
        self.kseg = refs.pop(0) if c.has_segments else None
        self.prefix = refs.pop(0)[batch] if c.has_prefix else None
        self.slopes = refs.pop(0) if c.has_alibi else None
        assert not refs


def _logits(c: _Static, q, k, q_start, k_start, slope, qseg, kseg, prefix, masked: bool):
    """Scaled logits `[bq, bk]` of a (query block, key block) pair, with ALiBi and, if `masked`, the mask."""
    s = _nt_dot(q, k) * c.sm_scale
    if not (c.has_alibi or masked):
        return s
    shape = s.shape
    rows = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    if c.has_alibi:
        s = s + slope * (cols - rows).astype(f32)
    if masked:
        visible = jnp.ones(shape, jnp.bool_)
        if c.causal:
            visible = cols <= rows
            if c.has_prefix:
                visible = visible | (cols < prefix)
        if c.key_padding:
            visible = visible & (cols < c.seq_k)
        if c.has_segments:
            visible = visible & (qseg == kseg)
        s = jnp.where(visible, s, MASKED)
    return s


def _needs_mask(c: _Static) -> bool:
    return c.causal or c.key_padding or c.has_segments


def _key_range(c: _Static, q_block, prefix):
    """(first masked key block, end) for a query block: blocks before the first are fully visible."""
    q_first = q_block * c.block_q
    if c.causal:
        last = q_first + c.block_q
        full = lax.div(q_first + 1, c.block_k)
        if c.has_prefix:
            last = jnp.maximum(last, prefix)
            full = jnp.maximum(full, lax.div(prefix, c.block_k))
        end = _cdiv(jnp.minimum(last, c.seq_k), c.block_k)
        full = jnp.minimum(full, end)
    else:
        end = -(-c.seq_k // c.block_k)
        full = c.seq_k // c.block_k
    if c.has_segments:
        full = 0
    return jnp.minimum(full, c.seq_k // c.block_k), end


def _query_range(c: _Static, k_block, prefix):
    """(first query block, first fully visible query block) for a key block."""
    k_first = k_block * c.block_k
    if c.causal:
        start = lax.div(k_first, c.block_q)
        full = _cdiv(k_first + c.block_k - 1, c.block_q)
        if c.has_prefix:
            start = jnp.where(k_first < prefix, 0, start)
            full = jnp.where(k_first + c.block_k <= prefix, 0, full)
        full = jnp.maximum(full, start)
    else:
        start, full = 0, 0
    if c.has_segments:
        full = c.nq
    elif c.key_padding:  # arithmetic, not a select: Triton mis-types a select between two constants
        full = jnp.maximum(full, (k_first + c.block_k > c.seq_k).astype(jnp.int32) * c.nq)
    return start, jnp.minimum(full, -(-c.seq_q // c.block_q))


def _overlap(a, b):
    """Whether two segment-id tiles share any id range (a cheap test that a block is not fully masked)."""
    return (jnp.min(a) <= jnp.max(b)) & (jnp.min(b) <= jnp.max(a))


def _loop(lo, hi, body, carry, skip_test=None):
    """fori_loop over [lo, hi) whose body is skipped where `skip_test(i)` is False."""
    if skip_test is None:
        return lax.fori_loop(lo, hi, body, carry)
    return lax.fori_loop(lo, hi, lambda i, cr: lax.cond(skip_test(i), lambda: body(i, cr), lambda: cr), carry)


# ----------------------------------------------------------------------------------------------- forward

def _fwd_kernel(q_ref, k_ref, v_ref, *refs, c: _Static):
    *ins, o_ref, lse_ref = refs
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ex = _Extras(c, ins, b)
    slope = ex.slopes[h] if c.has_alibi else None
    qseg = ex.qseg[...] if c.has_segments else None
    q = q_ref[...]
    bq = c.block_q

    def body(masked):
        def step(kb, carry):
            acc, m, l = carry
            kseg = ex.kseg[kb] if c.has_segments else None
            s = _logits(c, q, k_ref[kb], i * bq, kb * c.block_k, slope, qseg, kseg, ex.prefix, masked)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new)
            v = v_ref[kb]
            acc = alpha * acc + lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                preferred_element_type=f32)
            return acc, m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True)
        return step

    carry = (jnp.zeros((bq, c.dp), f32), jnp.full((bq, 1), MAX_INIT, f32), jnp.zeros((bq, 1), f32))
    full, end = _key_range(c, i, ex.prefix)
    carry = _loop(0, full, body(False), carry)
    if _needs_mask(c):
        skip = (lambda kb: _overlap(qseg, ex.kseg[kb])) if c.has_segments else None
        carry = _loop(full, end, body(True), carry, skip)
    acc, m, l = carry
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, LSE_EMPTY, m + jnp.log(l_safe))


def _extra_specs(c: _Static, qseg_map, kseg_map, q_side_full: bool):
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
    if c.has_alibi:
        specs.append(common.scalar_spec(c.target))
    return specs


def _q_block_specs(c: _Static):
    """Specs of the query-block-owning kernels (forward, dQ): grid (B, Hq, nq)."""
    g = c.groups
    q = pl.BlockSpec((None, None, None, c.block_q, c.dp), lambda b, h, i: (b, h, i, 0, 0))
    row = pl.BlockSpec((None, None, None, c.block_q, 1), lambda b, h, i: (b, h, i, 0, 0))
    kv = pl.BlockSpec((None, None, c.nk, c.block_k, c.dp), lambda b, h, i: (b, lax.div(h, g), 0, 0, 0))
    extras = _extra_specs(c, lambda b, h, i: (b, i, 0, 0), lambda b, h, i: (b, 0, 0, 0), q_side_full=False)
    return q, row, kv, extras


def _warps(c: _Static) -> int:
    return 4 if c.dp <= 64 else 8


def _forward_call(c: _Static, q5, k5, v5, *extras):
    """Output and log-sum-exp in `c`'s blocks; off TPU computed with blocks cut to fit shared memory."""
    if c.target == "tpu":
        return _forward_blocks(c, q5, k5, v5, *extras)
    cap = gpu_block_cap(c.head_dim, q5.dtype.itemsize)
    cs = c.reblocked(cap, cap)
    o5, lse = _forward_blocks(cs, _view(q5, cs.block_q), _view(k5, cs.block_k), _view(v5, cs.block_k),
                              *_view_extras(cs, extras))
    return _view(o5, c.block_q), _view(lse, c.block_q)


def _forward_blocks(c: _Static, q5, k5, v5, *extras):
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

def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, c: _Static):
    *ins, dq_ref = refs
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ex = _Extras(c, ins, b)
    slope = ex.slopes[h] if c.has_alibi else None
    qseg = ex.qseg[...] if c.has_segments else None
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def body(masked):
        def step(kb, dq):
            k, v = k_ref[kb], v_ref[kb]
            kseg = ex.kseg[kb] if c.has_segments else None
            s = _logits(c, q, k, i * c.block_q, kb * c.block_k, slope, qseg, kseg, ex.prefix, masked)
            p = jnp.exp(s - lse)
            ds = p * (_nt_dot(do, v) - delta)
            return dq + lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                        preferred_element_type=f32)
        return step

    dq = jnp.zeros((c.block_q, c.dp), f32)
    full, end = _key_range(c, i, ex.prefix)
    dq = _loop(0, full, body(False), dq)
    if _needs_mask(c):
        skip = (lambda kb: _overlap(qseg, ex.kseg[kb])) if c.has_segments else None
        dq = _loop(full, end, body(True), dq, skip)
    dq_ref[...] = (dq * c.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, c: _Static):
    *ins, dk_ref, dv_ref = refs
    b, hk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ex = _Extras(c, ins, b)
    kseg = ex.kseg[...] if c.has_segments else None
    k, v = k_ref[...], v_ref[...]

    def head(hi, carry):
        slope = ex.slopes[hk * c.groups + hi] if c.has_alibi else None

        def body(masked):
            def step(qb, carry):
                dk, dv = carry
                q, do = q_ref[hi, qb], do_ref[hi, qb]
                qseg = ex.qseg[qb] if c.has_segments else None
                s = _logits(c, q, k, qb * c.block_q, j * c.block_k, slope, qseg, kseg, ex.prefix, masked)
                p = jnp.exp(s - lse_ref[hi, qb])
                dv = dv + _tn_dot(p.astype(do.dtype), do)
                ds = p * (_nt_dot(do, v) - delta_ref[hi, qb])
                return dk + _tn_dot(ds.astype(q.dtype), q), dv
            return step

        start, full = _query_range(c, j, ex.prefix)
        if _needs_mask(c):
            skip = (lambda qb: _overlap(ex.qseg[qb], kseg)) if c.has_segments else None
            carry = _loop(start, full, body(True), carry, skip)
        return _loop(full, -(-c.seq_q // c.block_q), body(False), carry)

    zeros = jnp.zeros((c.block_k, c.dp), f32)
    dk, dv = lax.fori_loop(0, c.groups, head, (zeros, zeros))
    dk_ref[...] = (dk * c.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _view(x5, block: int):
    """`[B, H, n, blk, w]` viewed with another block size along the sequence."""
    b, h, n, blk, w = x5.shape
    return x5.reshape(b, h, n * blk // block, block, w)


def _view_extras(c: _Static, extras):
    """Segment ids re-cut for the blocks of `c` (prefix lengths and slopes pass through)."""
    if not c.has_segments:
        return list(extras)
    qseg, kseg, *rest = extras
    b = qseg.shape[0]
    return [qseg.reshape(b, c.nq, c.block_q, 1), kseg.reshape(b, c.nk, 1, c.block_k), *rest]


def _backward_call(c: _Static, q5, k5, v5, do5, lse, delta, *extras):
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


def _dq_call(c: _Static, q5, k5, v5, do5, lse, delta, *extras):
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


def _dkv_call(c: _Static, q5, k5, v5, do5, lse, delta, *extras):
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


def _rows(x, c: _Static):
    """Per-row float `[B, T, H]` -> `[B, H, nq, bq, 1]`."""
    return _to_blocks(x[..., None], c.len_q, c.block_q, 1)


def _extras(c: _Static, prefix_len, slopes, segment_ids):
    out = []
    if c.has_segments:
        seg = segment_ids.astype(jnp.int32)
        out.append(common.pad_axis(seg, 1, c.len_q, -1).reshape(seg.shape[0], c.nq, c.block_q, 1))
        out.append(common.pad_axis(seg, 1, c.len_k, -1).reshape(seg.shape[0], c.nk, 1, c.block_k))
    if c.has_prefix:
        out.append(prefix_len.astype(jnp.int32))
    if c.has_alibi:
        out.append(slopes.astype(f32))
    return out


def _run(c: _Static, call, *args):
    return common.dispatch(lambda t: functools.partial(call, dataclasses.replace(c, target=t)), *args,
                           interpret=c.interpret)


def _forward(c: _Static, q, k, v, prefix_len, slopes, segment_ids):
    q5 = _to_blocks(q, c.len_q, c.block_q, c.dp)
    k5 = _to_blocks(k, c.len_k, c.block_k, c.dp)
    v5 = _to_blocks(v, c.len_k, c.block_k, c.dp)
    extras = _extras(c, prefix_len, slopes, segment_ids)
    o5, lse = _run(c, _forward_call, q5, k5, v5, *extras)
    return _from_blocks(o5, c.seq_q, c.head_dim), (q5, k5, v5, extras, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(c: _Static, q, k, v, prefix_len, slopes, segment_ids):
    return _forward(c, q, k, v, prefix_len, slopes, segment_ids)[0]


def _flash_fwd(c, q, k, v, prefix_len, slopes, segment_ids):
    out, (q5, k5, v5, extras, lse) = _forward(c, q, k, v, prefix_len, slopes, segment_ids)
    return out, (q5, k5, v5, extras, lse, out)


def _flash_bwd(c, res, dout):
    q5, k5, v5, extras, lse, out = res
    delta = jnp.sum(out.astype(f32) * dout.astype(f32), axis=-1)  # [B, T, Hq]: rowsum(dO * O)
    do5 = _to_blocks(dout, c.len_q, c.block_q, c.dp)
    dq5, dk5, dv5 = _run(c, _backward_call, q5, k5, v5, do5, lse, _rows(delta, c), *extras)
    return (_from_blocks(dq5, c.seq_q, c.head_dim), _from_blocks(dk5, c.seq_k, c.head_dim),
            _from_blocks(dv5, c.seq_k, c.head_dim), None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, causal: bool = True, prefix_len=None, alibi_slopes=None, segment_ids=None,
                    sm_scale: Optional[float] = None, block_q: int = 128, block_k: int = 128, interpret=None):
    """Pallas flash attention `[B, T, Hq, D] x [B, S, Hkv, D] -> [B, T, Hq, D]`, differentiable in q, k, v.

    Same arguments and results as `reference.flash_attention`; block_q / block_k (powers of two >= 16) are
    upper bounds, shrunk for short sequences. Rows that can see no key at all give zeros.
    """
    _check(q, k, v, prefix_len, alibi_slopes, segment_ids)
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    bq, bk = common.tile(t, block_q, "block_q"), common.tile(s, block_k, "block_k")
    c = _Static(causal=bool(causal), sm_scale=float(d ** -0.5 if sm_scale is None else sm_scale), block_q=bq,
                block_k=bk, seq_q=t, seq_k=s, len_q=common.round_up(t, bq), len_k=common.round_up(s, bk),
                head_dim=d, groups=hq // hkv, has_prefix=bool(causal) and prefix_len is not None,
                has_alibi=alibi_slopes is not None, has_segments=segment_ids is not None, interpret=interpret)
    return _flash(c, q, k, v, prefix_len, alibi_slopes, segment_ids)


def _check(q, k, v, prefix_len, slopes, segment_ids):
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

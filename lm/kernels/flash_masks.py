"""What a flash attention program knows about its blocks: the static description of a call, the mask of a
(query block, key block) pair, and which blocks the loops visit (`key_range`, `query_range`).

Kept apart from the kernels in `flash` so that the masking and block-skipping rules (causal, prefix-LM,
sliding window, packed segments, key padding) can be read in one place.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
from jax import lax

from lm.kernels import common
from lm.kernels.common import MASKED

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Static:
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
    has_window: bool
    softcap: Optional[float]
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

    def reblocked(self, block_q: int, block_k: int) -> "Static":
        """The same arrays viewed with smaller blocks (sizes that divide the current ones)."""
        return dataclasses.replace(self, block_q=min(block_q, self.block_q), block_k=min(block_k, self.block_k))


def cdiv(a, b: int):
    """ceil(a / b) of a traced non-negative int."""
    return lax.div(a + (b - 1), b)


def nt_dot(a, b):
    """a @ b.T with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=f32)


class Extras:
    """The optional inputs' refs of a program: segment ids, prefix length, window and ALiBi slope."""

    def __init__(self, c: Static, refs, batch):
        refs = list(refs)
        self.qseg = refs.pop(0) if c.has_segments else None
        self.kseg = refs.pop(0) if c.has_segments else None
        self.prefix = refs.pop(0)[batch] if c.has_prefix else None
        self.window = refs.pop(0)[0] if c.has_window else None
        self.slopes = refs.pop(0) if c.has_alibi else None
        assert not refs


def logits(c: Static, q, k, q_start, k_start, slope, qseg, kseg, ex: Extras, masked: bool):
    """Logits `[bq, bk]` of a (query block, key block) pair: scaled, soft-capped, with ALiBi and, if `masked`,
    the mask; and `tanh(scaled / cap)` (None without a cap), whose `1 - t**2` the backward's chain rule needs."""
    s = nt_dot(q, k) * c.sm_scale
    t = None
    if c.softcap is not None:
        t = jnp.tanh(s / c.softcap)
        s = c.softcap * t
    if not (c.has_alibi or masked):
        return s, t
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
                visible = visible | (cols < ex.prefix)
        if c.has_window:
            visible = visible & (cols > rows - ex.window)
        if c.key_padding:
            visible = visible & (cols < c.seq_k)
        if c.has_segments:
            visible = visible & (qseg == kseg)
        s = jnp.where(visible, s, MASKED)
    return s, t


def needs_mask(c: Static) -> bool:
    """Whether any block of the call can hold a hidden key (otherwise no loop builds a mask)."""
    return c.causal or c.key_padding or c.has_segments or c.has_window


def key_range(c: Static, q_block, ex: Extras):
    """(start, first masked key block, end) for a query block: blocks in [start, first masked) are fully
    visible, those before start lie wholly outside the sliding window."""
    q_first = q_block * c.block_q
    if c.causal:
        last = q_first + c.block_q
        full = lax.div(q_first + 1, c.block_k)
        if c.has_prefix:
            last = jnp.maximum(last, ex.prefix)
            full = jnp.maximum(full, lax.div(ex.prefix, c.block_k))
        end = cdiv(jnp.minimum(last, c.seq_k), c.block_k)
        full = jnp.minimum(full, end)
    else:
        end = -(-c.seq_k // c.block_k)
        full = c.seq_k // c.block_k
    if c.has_window:  # first key the block's first row sees: q_first - window + 1
        start = lax.div(jnp.maximum(q_first - ex.window + 1, 0), c.block_k)
        return start, start, end
    if c.has_segments:
        full = 0
    return 0, jnp.minimum(full, c.seq_k // c.block_k), end


def query_range(c: Static, k_block, ex: Extras):
    """(first query block, first fully visible query block, end) for a key block; with a sliding window the
    blocks end after the last one whose rows reach the key block (row i sees keys j > i - window)."""
    k_first = k_block * c.block_k
    end = -(-c.seq_q // c.block_q)
    if c.causal:
        start = lax.div(k_first, c.block_q)
        full = cdiv(k_first + c.block_k - 1, c.block_q)
        if c.has_prefix:
            start = jnp.where(k_first < ex.prefix, 0, start)
            full = jnp.where(k_first + c.block_k <= ex.prefix, 0, full)
        full = jnp.maximum(full, start)
    else:
        start, full = 0, 0
    if c.has_window:  # last row that sees the block's last key: k_first + block_k - 2 + window
        end = jnp.minimum(cdiv(k_first + c.block_k - 1 + ex.window, c.block_q), end)
        return start, end, end
    if c.has_segments:
        full = c.nq
    elif c.key_padding:  # arithmetic, not a select: Triton mis-types a select between two constants
        full = jnp.maximum(full, (k_first + c.block_k > c.seq_k).astype(jnp.int32) * c.nq)
    return start, jnp.minimum(full, end), end


def overlap(a, b):
    """Whether two segment-id tiles share any id range (a cheap test that a block is not fully masked)."""
    return (jnp.min(a) <= jnp.max(b)) & (jnp.min(b) <= jnp.max(a))


def softcap_grad(t, ds):
    """dL/d(scaled logits) from dL/d(capped logits): `c = cap * tanh(s / cap)` has `dc/ds = 1 - tanh**2`."""
    return ds if t is None else ds * (1.0 - t * t)

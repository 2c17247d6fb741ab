"""Pure-JAX references for the attention and RoPE kernels (the `attention_impl="xla"` path).

Shapes: `q: [B, T, Hq, D]`, `k, v: [B, S, Hkv, D]` with Hq a multiple of Hkv (GQA/MQA); query position i
and key position j are indices into the same sequence (T == S for full attention).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def alibi_slopes(n_heads: int) -> jnp.ndarray:
    """ALiBi head slopes as BLOOM defines them, including head counts that are not a power of two."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != n_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        n_extra = min(closest, n_heads - closest)
        slopes += [extra_base ** (2 * i + 1) for i in range(n_extra)]
    return jnp.asarray(slopes, jnp.float32)


def attention_mask(q_idx, k_idx, *, causal=True, prefix_len=None, segment_ids=None, kv_segment_ids=None):
    """Boolean `[B, 1, T, S]` mask (True = may attend) from query/key indices `q_idx: [B, T]`, `k_idx: [S]`.

    causal: key j is visible from query i when j <= i; prefix_len ([B]) additionally makes keys
    j < prefix_len[b] visible from every query (GLM's bidirectional prefix); segment_ids ([B, T]) keep
    attention inside each packed sequence.
    """
    mask = jnp.ones(q_idx.shape + k_idx.shape[-1:], bool)
    if causal:
        mask = k_idx[None, None, :] <= q_idx[:, :, None]
        if prefix_len is not None:
            mask = mask | (k_idx[None, None, :] < prefix_len[:, None, None])
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = mask & (segment_ids[:, :, None] == kv_seg[:, None, :])
    return mask[:, None]


def _attend(q, k, v, mask, bias, sm_scale):
    """Softmax attention with GQA grouping; `mask: [B, 1, T, S]`, `bias: [B|1, Hq, T, S]` or None."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, t, hkv, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * sm_scale
    if bias is not None:
        logits = logits + bias.reshape(bias.shape[0], hkv, g, *bias.shape[-2:])
    logits = jnp.where(mask[:, :, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


def flash_attention(q, k, v, *, causal: bool = True, prefix_len=None, alibi_slopes=None, segment_ids=None,
                    sm_scale: Optional[float] = None, block_q: int = 128, block_k: int = 128, interpret=None):
    """Attention over a whole sequence: `[B, T, Hq, D] x [B, S, Hkv, D] -> [B, T, Hq, D]`.

    prefix_len: int32 [B], bidirectional over the first prefix_len[b] keys (only with causal=True).
    alibi_slopes: f32 [Hq], adds `slope_h * (j - i)` to the logits. segment_ids: int32 [B, T] (T == S).
    block_q, block_k and interpret are accepted for signature parity with the Pallas kernel.
    """
    del block_q, block_k, interpret
    b, t = q.shape[:2]
    s = k.shape[1]
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    q_idx = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    k_idx = jnp.arange(s)
    mask = attention_mask(q_idx, k_idx, causal=causal, prefix_len=prefix_len, segment_ids=segment_ids)
    bias = None
    if alibi_slopes is not None:
        rel = (k_idx[None, :] - q_idx[0][:, None]).astype(jnp.float32)  # [T, S]
        bias = alibi_slopes[None, :, None, None] * rel[None, None]
    return _attend(q, k, v, mask, bias, sm_scale)


def decode_attention(q, k_cache, v_cache, lengths, *, alibi_slopes=None, sm_scale: Optional[float] = None,
                     block_k: int = 128, interpret=None):
    """One new token per row against a KV cache: `q: [B, Hq, D]`, caches `[B, S, Hkv, D]`, `lengths: [B]`.

    Row b attends to cache positions j < lengths[b]; the query sits at position lengths[b] - 1.
    """
    del block_k, interpret
    s = k_cache.shape[1]
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    k_idx = jnp.arange(s)
    mask = (k_idx[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, S]
    bias = None
    if alibi_slopes is not None:
        rel = (k_idx[None, :] - (lengths[:, None] - 1)).astype(jnp.float32)  # [B, S]
        bias = alibi_slopes[None, :, None, None] * rel[:, None, None, :]
    return _attend(q[:, None], k_cache, v_cache, mask, bias, sm_scale)[:, 0]


def rope(x, positions, *, theta: float = 10000.0, rotary_dim: Optional[int] = None, interleaved: bool = False,
         interpret=None):
    """Rotary position embedding of `x: [B, T, H, D]` at `positions: [B, T]` (or `[B, T, 2]` for GLM 2D).

    The first `rotary_dim` dims are rotated (all by default). Rotate-half pairs dim i with i + rd/2 (LLaMA/HF);
    interleaved pairs 2i with 2i+1 (GPT-J, GLM-4). With 2D positions (ChatGLM-6B) the rotary dims are split
    in two halves: the first follows positions[..., 0], the second positions[..., 1].
    """
    del interpret
    d = x.shape[-1]
    rd = d if rotary_dim is None else rotary_dim
    if positions.ndim == 3:
        half = rd // 2
        a = _rotate(x[..., :half], positions[..., 0], theta, interleaved)
        b = _rotate(x[..., half:rd], positions[..., 1], theta, interleaved)
        return jnp.concatenate([a, b, x[..., rd:]], axis=-1)
    return jnp.concatenate([_rotate(x[..., :rd], positions, theta, interleaved), x[..., rd:]], axis=-1)


def _rotate(x, positions, theta, interleaved):
    rd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rd/2]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    xf = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
    else:
        x1, x2 = xf[..., : rd // 2], xf[..., rd // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)

"""Pure-JAX references for the attention and RoPE kernels (the `attention_impl="xla"` path).

Shapes: `q: [B, T, Hq, D]`, `k, v: [B, S, Hkv, D]` with Hq a multiple of Hkv (GQA/MQA); query position i
and key position j are indices into the same sequence (T == S for full attention).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are stretched past the pretraining context (static, hashable).

    kind: "linear", "llama3" or "yarn" (see `ModelConfig.rope_scaling`); the other fields as in ModelConfig.
    """
    kind: str
    factor: float
    original_max_len: Optional[int] = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None
    truncate: bool = True


def rope_frequencies(rotary_dim: int, theta: float, scaling: Optional[RopeScaling] = None):
    """`(inv_freq [rotary_dim / 2] f32, cos/sin factor)` of a RoPE block, the frequencies scaled by `scaling`.

    The scaled kinds follow the formulas of `transformers.modeling_rope_utils` step by step in float32.
    """
    rd = rotary_dim
    if scaling is None:
        return 1.0 / (theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd)), 1.0
    f32 = np.float32
    exponent = np.arange(0, rd, 2).astype(f32) / f32(rd)
    pos_freqs = (f32(theta) ** exponent).astype(f32)
    inv_freq = (f32(1.0) / pos_freqs).astype(f32)
    factor = scaling.factor
    if scaling.kind == "linear":
        return jnp.asarray(inv_freq / f32(factor)), 1.0
    if scaling.kind == "llama3":
        old = scaling.original_max_len
        low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
        wavelen = (f32(2 * math.pi) / inv_freq).astype(f32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / f32(factor), inv_freq).astype(f32)
        smooth = ((f32(old) / wavelen - f32(scaling.low_freq_factor))
                  / f32(scaling.high_freq_factor - scaling.low_freq_factor)).astype(f32)
        smoothed = ((1 - smooth) * scaled / f32(factor) + smooth * scaled).astype(f32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return jnp.asarray(np.where(medium, smoothed, scaled).astype(f32)), 1.0
    if scaling.kind == "yarn":
        attention = scaling.attention_factor
        if attention is None:
            attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

        def correction_dim(rotations):
            return rd * math.log(scaling.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rd - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(rd // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
        extrapolation = (1 - ramp).astype(f32)
        interpolation = (f32(1.0) / (f32(factor) * pos_freqs)).astype(f32)
        inv = (interpolation * (1 - extrapolation) + inv_freq * extrapolation).astype(f32)
        return jnp.asarray(inv), float(attention)
    raise ValueError(f"rope scaling kind {scaling.kind!r} is not implemented (linear, llama3, yarn are)")


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


def attention_mask(q_idx, k_idx, *, causal=True, prefix_len=None, segment_ids=None, kv_segment_ids=None,
                   window=None):
    """Boolean `[B, 1, T, S]` mask (True = may attend) from query/key indices `q_idx: [B, T]`, `k_idx: [S]`.

    causal: key j is visible from query i when j <= i; prefix_len ([B]) additionally makes keys
    j < prefix_len[b] visible from every query (GLM's bidirectional prefix); segment_ids ([B, T]) keep
    attention inside each packed sequence; window (an int, possibly traced) hides keys j <= i - window.
    """
    mask = jnp.ones(q_idx.shape + k_idx.shape[-1:], bool)
    if causal:
        mask = k_idx[None, None, :] <= q_idx[:, :, None]
        if prefix_len is not None:
            mask = mask | (k_idx[None, None, :] < prefix_len[:, None, None])
    if window is not None:
        mask = mask & (k_idx[None, None, :] > q_idx[:, :, None] - window)
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = mask & (segment_ids[:, :, None] == kv_seg[:, None, :])
    return mask[:, None]


def softcap(logits, cap: Optional[float]):
    """`cap * tanh(logits / cap)` (Gemma2's logit soft-capping); identity when cap is None."""
    return logits if cap is None else cap * jnp.tanh(logits / cap)


_softcap = softcap  # for functions whose `softcap` argument hides it


def _attend(q, k, v, mask, bias, sm_scale, cap=None):
    """Softmax attention with GQA grouping; `mask: [B, 1, T, S]`, `bias: [B|1, Hq, T, S]` or None."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, t, hkv, g, d)
    logits = softcap(jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * sm_scale, cap)
    if bias is not None:
        logits = logits + bias.reshape(bias.shape[0], hkv, g, *bias.shape[-2:])
    logits = jnp.where(mask[:, :, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


def flash_attention(q, k, v, *, causal: bool = True, prefix_len=None, alibi_slopes=None, segment_ids=None,
                    sm_scale: Optional[float] = None, window=None, softcap: Optional[float] = None,
                    block_q: int = 128, block_k: int = 128, interpret=None):
    """Attention over a whole sequence: `[B, T, Hq, D] x [B, S, Hkv, D] -> [B, T, Hq, D]`.

    prefix_len: int32 [B], bidirectional over the first prefix_len[b] keys (only with causal=True).
    alibi_slopes: f32 [Hq], adds `slope_h * (j - i)` to the logits. segment_ids: int32 [B, T] (T == S).
    window: sliding window (int or int32 scalar): query i sees keys j > i - window. softcap: logits become
    `softcap * tanh(logits / softcap)` after scaling, before ALiBi and the mask.
    block_q, block_k and interpret are accepted for signature parity with the Pallas kernel.
    """
    del block_q, block_k, interpret
    b, t = q.shape[:2]
    s = k.shape[1]
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    q_idx = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    k_idx = jnp.arange(s)
    mask = attention_mask(q_idx, k_idx, causal=causal, prefix_len=prefix_len, segment_ids=segment_ids,
                          window=window)
    bias = None
    if alibi_slopes is not None:
        rel = (k_idx[None, :] - q_idx[0][:, None]).astype(jnp.float32)  # [T, S]
        bias = alibi_slopes[None, :, None, None] * rel[None, None]
    return _attend(q, k, v, mask, bias, sm_scale, softcap)


def decode_attention(q, k_cache, v_cache, lengths, *, alibi_slopes=None, sm_scale: Optional[float] = None,
                     window=None, softcap: Optional[float] = None, block_k: int = 128, interpret=None):
    """One new token per row against a KV cache: `q: [B, Hq, D]`, caches `[B, Hkv, S, D]`, `lengths: [B]`.

    Row b attends to cache positions j < lengths[b]; the query sits at position lengths[b] - 1. window and
    softcap as in `flash_attention`. Both contractions are batched over (B, Hkv), the cache's leading axes,
    so neither needs the cache transposed.
    """
    del block_k, interpret
    b, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    qg = q.reshape(b, hkv, hq // hkv, d)
    logits = jnp.einsum("bkgd,bksd->bkgs", qg, k_cache, preferred_element_type=jnp.float32) * sm_scale
    logits = _softcap(logits, softcap)
    k_idx = jnp.arange(s)
    visible = k_idx[None, :] < lengths[:, None]  # [B, S]
    if window is not None:
        visible = visible & (k_idx[None, :] > lengths[:, None] - 1 - window)
    if alibi_slopes is not None:
        rel = (k_idx[None, :] - (lengths[:, None] - 1)).astype(jnp.float32)  # [B, S]
        logits = logits + alibi_slopes.reshape(1, hkv, hq // hkv, 1) * rel[:, None, None, :]
    probs = jax.nn.softmax(jnp.where(visible[:, None, None, :], logits, NEG_INF), axis=-1)
    out = jnp.einsum("bkgs,bksd->bkgd", probs.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    return out.reshape(b, hq, d).astype(q.dtype)


def rope(x, positions, *, theta: float = 10000.0, rotary_dim: Optional[int] = None, interleaved: bool = False,
         scaling: Optional[RopeScaling] = None, interpret=None):
    """Rotary position embedding of `x: [B, T, H, D]` at `positions: [B, T]` (or `[B, T, 2]` for GLM 2D).

    The first `rotary_dim` dims are rotated (all by default). Rotate-half pairs dim i with i + rd/2 (LLaMA/HF);
    interleaved pairs 2i with 2i+1 (GPT-J, GLM-4). With 2D positions (ChatGLM-6B) the rotary dims are split
    in two halves: the first follows positions[..., 0], the second positions[..., 1]. `scaling` stretches the
    frequencies (`rope_frequencies`).
    """
    del interpret
    d = x.shape[-1]
    rd = d if rotary_dim is None else rotary_dim
    if positions.ndim == 3:
        half = rd // 2
        a = _rotate(x[..., :half], positions[..., 0], theta, interleaved)
        b = _rotate(x[..., half:rd], positions[..., 1], theta, interleaved)
        return jnp.concatenate([a, b, x[..., rd:]], axis=-1)
    return jnp.concatenate([_rotate(x[..., :rd], positions, theta, interleaved, scaling), x[..., rd:]], axis=-1)


def _rotate(x, positions, theta, interleaved, scaling=None):
    rd = x.shape[-1]
    inv_freq, factor = rope_frequencies(rd, theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rd/2]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    xf = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
    else:
        x1, x2 = xf[..., : rd // 2], xf[..., rd // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)

"""Pure logit filters for sampling: temperature, top-k and nucleus (top-p).

Each takes logits `[..., V]` and returns logits of the same shape where removed tokens are `-inf`, so
`jax.random.categorical` and `jax.nn.log_softmax` can be applied to the result directly. Filters are applied
in the order Hugging Face uses: temperature, then top-k, then top-p.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_temperature(logits, temperature: float):
    """`logits / temperature` in float32; `temperature` must be positive (0 means greedy, handled by callers)."""
    if temperature <= 0:
        raise ValueError(f"apply_temperature: temperature must be > 0, got {temperature}")
    return logits.astype(jnp.float32) / temperature


def top_k_filter(logits, k: int):
    """Keep the `k` largest logits of each row (ties with the k-th are kept); `k <= 0` or `k >= V` keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits, p: float):
    """Nucleus filter: keep the most probable tokens whose probability mass before them is below `p`.

    Token i (in descending order of probability) is kept when the summed probability of the tokens ranked
    above it is `< p`, so the most probable token is always kept and the kept set is the smallest whose
    mass reaches `p`. Ties with the last kept logit are kept. `p >= 1` keeps all.
    """
    if p >= 1.0:
        return logits
    if p <= 0.0:
        raise ValueError(f"top_p_filter: p must be in (0, 1], got {p}")
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # >= 1: mass_before[0] == 0
    cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def filter_logits(logits, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Temperature, then top-k, then top-p: the distribution a sampler draws from (as logits)."""
    return top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)

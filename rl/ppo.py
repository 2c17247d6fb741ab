"""PPO for RLHF as pure functions of arrays: GAE, KL estimators, whitening, clipped losses, KL control.

Shapes: `B` rollouts, `T` response tokens. `mask` is float `[B, T]` with 1 on real response tokens (up to
and including EOS) and 0 on padding after the end. The stateful loop that moves models and data lives in
`rl.ppo_step`; everything here is testable against a NumPy loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_same_shape(where: str, **arrays):
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"rl.ppo.{where}: arrays must share one shape, got {shapes}")


def masked_mean(x, mask, axis=None):
    """Mean of `x` over positions where `mask` is 1 (0 when nothing is masked in)."""
    return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) as a reverse `lax.scan` over time.

    `delta_t = r_t + gamma * V_{t+1} * mask_{t+1} - V_t`, `A_t = (delta_t + gamma * lam * A_{t+1}) * mask_t`;
    the value after the last response token is 0 (the episode ends there). Returns `(advantages, returns)`,
    both `[B, T]`, with `returns = advantages + values` on real tokens and 0 on padding.
    """
    _check_same_shape("gae", rewards=rewards, values=values, mask=mask)
    rewards, values, mask = (jnp.asarray(a, jnp.float32) for a in (rewards, values, mask))
    next_values = jnp.concatenate([values[:, 1:] * mask[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def step(carry, xs):
        delta, m = xs
        adv = (delta + gamma * lam * carry) * m
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros_like(rewards[:, 0]), (deltas.T, mask.T), reverse=True)
    adv = adv.T
    return adv, (adv + values) * mask


def kl_penalty(logprobs, ref_logprobs, kind: str = "k1"):
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.

    k1 = log p - log q (unbiased, can be negative); k2 = (log p - log q)^2 / 2; k3 = (r - 1) - log r with
    r = q / p (unbiased and non-negative; Schulman's estimator). `kind` picks one.
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    if kind == "k3":
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f"rl.ppo.kl_penalty: unknown KL estimator {kind!r}; use 'k1', 'k2' or 'k3'")


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """Normalise `x` to unit variance (and zero mean if `shift_mean`) over the masked-in positions.

    The variance has Bessel's correction, as in TRL. Padding positions come back as 0.
    """
    _check_same_shape("whiten", x=x, mask=mask)
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = (jnp.square(x - mean) * mask).sum() / jnp.maximum(n - 1.0, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum")


def aggregate(per_token, mask, how: str = "token_mean", horizon: int | None = None):
    """One loss from per-token values `[B, T]` (rl.algorithms.RLConfig.loss_agg).

    token_mean: `sum(x * m) / sum(m)` over the batch (PPO, DAPO); seq_mean: the mean over sequences with
    tokens of `sum_t(x * m) / sum_t(m)` (GRPO); seq_sum: `sum(x * m) / (B * horizon)`, `horizon` = T by
    default (Dr. GRPO's constant normaliser).
    """
    _check_same_shape("aggregate", per_token=per_token, mask=mask)
    if how == "token_mean":
        return masked_mean(per_token, mask)
    if how == "seq_mean":
        lengths = mask.sum(-1)
        per_seq = (per_token * mask).sum(-1) / jnp.maximum(lengths, 1.0)
        has = (lengths > 0).astype(jnp.float32)
        return (per_seq * has).sum() / jnp.maximum(has.sum(), 1.0)
    if how == "seq_sum":
        return (per_token * mask).sum() / (per_token.shape[0] * (horizon or per_token.shape[1]))
    raise ValueError(f"rl.ppo.aggregate: unknown aggregation {how!r}; use one of {LOSS_AGGREGATIONS}")


def policy_loss(logprobs, old_logprobs, advantages, mask, clip: float, clip_high: float | None = None,
                agg: str = "token_mean", horizon: int | None = None):
    """PPO's clipped surrogate per token, `max(-A r, -A clip(r, 1 - clip, 1 + clip_high))`, aggregated by `agg`.

    clip_high: the upper epsilon ("clip-higher", DAPO); None = `clip`. agg/horizon: see `aggregate` (default:
    the masked mean over tokens). Returns `(loss, metrics)` with the fraction of clipped tokens and the
    approximate KL `mean((r - 1) - log r)` between the new and the rollout policy.
    """
    _check_same_shape("policy_loss", logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
                      mask=mask)
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + (clip if clip_high is None else clip_high))
    loss = aggregate(jnp.maximum(unclipped, clipped), mask, agg, horizon)
    metrics = {"policy_clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
               "approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask)}
    return loss, metrics


def value_loss(values, old_values, returns, mask, clip: float):
    """Clipped value loss `0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)`, masked mean."""
    _check_same_shape("value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    loss_unclipped = jnp.square(values - returns)
    loss_clipped = jnp.square(clipped - returns)
    loss = 0.5 * masked_mean(jnp.maximum(loss_unclipped, loss_clipped), mask)
    # Inside the clip range both branches agree up to rounding: count only tokens really outside it.
    used_clip = (jnp.abs(values - old_values) > clip) & (loss_clipped > loss_unclipped)
    return loss, {"value_clipfrac": masked_mean(used_clip.astype(jnp.float32), mask)}


def entropy(logits, mask):
    """Masked mean entropy of the categorical distributions `logits: [B, T, V]` (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ent = -(jnp.exp(logp) * logp).sum(-1)
    return masked_mean(ent, mask)


def token_logprobs(logits, tokens, temperature: float = 1.0):
    """Log-probs of `tokens: [B, T]` under `logits / temperature: [B, T, V]`, in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def update_kl_coef(coef, kl, n_steps, *, adaptive: bool, target: float = 6.0, horizon: float = 10000.0):
    """Next KL coefficient. Fixed: unchanged. Adaptive (Ziegler et al. 2019): a proportional controller,

    `e = clip(kl / target - 1, -0.2, 0.2)`, `coef *= 1 + e * n_steps / horizon`, where `kl` is the mean
    per-sequence KL of the last batch and `n_steps` the number of sequences in it.
    """
    if not adaptive:
        return coef
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def last_token_index(mask):
    """Index of the last masked-in position of each row of `mask: [B, T]` (0 for an empty row)."""
    return jnp.maximum(mask.sum(-1).astype(jnp.int32) - 1, 0)


def score_with_eos_penalty(scores, has_eos, penalty):
    """Reward-model scores minus `penalty` for responses that ended without EOS (TRL's missing_eos_penalty).

    `penalty=None` leaves the scores unchanged.
    """
    if penalty is None:
        return scores
    return jnp.where(has_eos, scores, scores - penalty)


def token_rewards(scores, kl, mask, kl_coef):
    """Per-token rewards: `-kl_coef * kl_t` on every response token, plus the sequence score on the last one.

    scores: `[B]` reward-model scores; kl: `[B, T]` per-token KL estimates; mask: `[B, T]`.
    """
    _check_same_shape("token_rewards", kl=kl, mask=mask)
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"rl.ppo.token_rewards: scores {scores.shape} must be [B] for kl {kl.shape}")
    last = jax.nn.one_hot(last_token_index(mask), kl.shape[1], dtype=jnp.float32)
    has_tokens = (mask.sum(-1) > 0).astype(jnp.float32)
    return (-kl_coef * kl) * mask + last * (scores * has_tokens)[:, None]

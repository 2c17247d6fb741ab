"""Direct Preference Optimisation (Rafailov et al. 2023) on K-wise ranked preference data.

The policy is trained directly on the reward-model data, against a frozen reference (the SFT model): every
untied pair of a prompt's K responses is a (chosen, rejected) pair, weighted so each prompt counts the same,
as in the reward model's ranking loss. Reference log-probs are computed once per batch outside the gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.model import Transformer


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """Per-pair DPO loss from summed sequence log-probs; returns `(losses, logits)` with the pair's shape.

    `logits = beta * ((pi_w - pi_l) - (ref_w - ref_l))`, `loss = -(1 - eps) log s(logits) - eps log s(-logits)`
    (eps = label_smoothing: conservative DPO, labels flipped with probability eps).
    """
    shapes = {tuple(jnp.shape(a)) for a in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"rl.dpo.dpo_loss: the four log-prob arrays must share one shape, got {shapes}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"rl.dpo.dpo_loss: label_smoothing={label_smoothing} must be in [0, 0.5)")
    logits = beta * ((policy_chosen - policy_rejected) - (ref_chosen - ref_rejected))
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)
    return losses, logits


def ranked_dpo_loss(policy_logps, ref_logps, ranks, beta: float, label_smoothing: float = 0.0):
    """DPO over all untied pairs of K ranked responses per prompt; returns `(loss, metrics)`.

    policy_logps, ref_logps: `[B, K]` summed response log-probs; ranks: int `[B, K]` (0 = best, -1 = absent).
    Metrics: `reward_accuracy` (implicit reward of the chosen above the rejected), `reward_margin`.
    """
    if policy_logps.shape != ranks.shape or ref_logps.shape != ranks.shape or ranks.ndim != 2:
        raise ValueError(f"rl.dpo.ranked_dpo_loss: policy {policy_logps.shape}, reference {ref_logps.shape} and "
                         f"ranks {ranks.shape} must all be [B, K]")
    present = ranks >= 0
    pair = ((ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None] & present[:, None, :]).astype(jnp.float32)
    pi_w, pi_l = policy_logps[:, :, None], policy_logps[:, None, :]
    ref_w, ref_l = ref_logps[:, :, None], ref_logps[:, None, :]
    shape = pair.shape
    losses, logits = dpo_loss(*(jnp.broadcast_to(a, shape) for a in (pi_w, pi_l, ref_w, ref_l)), beta,
                              label_smoothing)
    n_pairs = pair.sum((1, 2))
    has_pairs = (n_pairs > 0).astype(jnp.float32)
    prompt_loss = (losses * pair).sum((1, 2)) / jnp.maximum(n_pairs, 1.0)
    loss = (prompt_loss * has_pairs).sum() / jnp.maximum(has_pairs.sum(), 1.0)
    total = jnp.maximum(pair.sum(), 1.0)
    metrics = {"reward_accuracy": ((logits > 0) * pair).sum() / total,
               "reward_margin": (logits * pair).sum() / total / beta}
    return loss, metrics


def sequence_logprobs(cfg: ModelConfig, params, tokens, response_mask, prefix_len=None):
    """Summed log-probs of the response tokens: `[B, K]` from tokens `[B, K, T]` and response_mask `[B, K, T]`.

    response_mask[b, k, t] = 1 when token t belongs to the response (it is predicted from position t - 1).
    """
    if tokens.ndim != 3 or response_mask.shape != tokens.shape:
        raise ValueError(f"rl.dpo.sequence_logprobs: tokens {tuple(tokens.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must both be [B, K, T]")
    b, k, t = tokens.shape
    flat = tokens.reshape(b * k, t)
    flat_prefix = None if prefix_len is None else prefix_len.reshape(b * k)
    logits = Transformer(cfg).apply({"params": params}, flat, prefix_len=flat_prefix)[:, :-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok_logp = jnp.take_along_axis(logp, flat[:, 1:, None], axis=-1)[..., 0]
    mask = response_mask.reshape(b * k, t)[:, 1:].astype(jnp.float32)
    return (tok_logp * mask).sum(-1).reshape(b, k)


def dpo_loss_fn(cfg: ModelConfig, beta: float, label_smoothing: float = 0.0):
    """`loss_fn(params, batch, rng) -> (loss, metrics)` for the generic train step.

    batch: `tokens [B, K, T]`, `response_mask [B, K, T]`, `ranks [B, K]`, `ref_logps [B, K]` (from
    `reference_logps`), optional `prefix_len [B, K]`.
    """
    def loss_fn(params, batch, rng):
        del rng
        logps = sequence_logprobs(cfg, params, batch["tokens"], batch["response_mask"], batch.get("prefix_len"))
        return ranked_dpo_loss(logps, batch["ref_logps"], batch["ranks"], beta, label_smoothing)
    return loss_fn


def reference_logps(cfg: ModelConfig):
    """A jitted `f(ref_params, batch) -> [B, K]` giving the frozen reference's response log-probs."""
    @jax.jit
    def f(ref_params, batch):
        return sequence_logprobs(cfg, ref_params, batch["tokens"], batch["response_mask"], batch.get("prefix_len"))
    return f

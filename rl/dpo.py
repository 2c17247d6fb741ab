"""Direct Preference Optimisation (Rafailov et al. 2023) on K-wise ranked preference data.

The policy is trained directly on the reward-model data, against a frozen reference (the SFT model): every
untied pair of a prompt's K responses is a (chosen, rejected) pair, weighted so each prompt counts the same,
as in the reward model's ranking loss. Reference log-probs are computed once per batch outside the gradient.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from lm import sharding
from lm.config import ModelConfig
from lm.losses import token_log_probs
from lm.model import Transformer, dropout_rngs


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """DPO recipe (configs/dpo.py's `dpo` section is built from it).

    Attributes:
      beta: strength of the implicit KL to the reference (DPO paper and TRL: 0.1).
      label_smoothing: conservative DPO, the assumed probability that a label is flipped (TRL: 0.0).
    """
    beta: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.beta <= 0 or not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo: beta={self.beta} must be > 0 and label_smoothing={self.label_smoothing} in [0, 0.5)")


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
    Metrics: `reward_accuracy` (implicit reward of the chosen above the rejected), `reward_margin` (of the
    implicit rewards `log pi - log ref`), `prompts` (prompts with at least one untied pair).
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
               "reward_margin": (logits * pair).sum() / total / beta, "prompts": has_pairs.sum()}
    return loss, metrics


def sequence_logprobs(cfg: ModelConfig, params, inputs, targets, loss_mask, prefix_len=None,
                      temperature: float = 1.0, rng=None):
    """Summed log-probs of the response tokens, `[B, K]`, from LM-convention arrays `[B, K, T]`.

    inputs/targets/loss_mask follow lm.data.preference_dataset: `targets` are the next tokens and
    `loss_mask` is 1 on response tokens (and their eos). prefix_len: `[B, K]` for prefix-LM models (GLM).
    temperature: log-probs under `softmax(logits / temperature)` (a policy sampled at that temperature).
    rng: dropout key of a training pass (LoRA dropout); None is deterministic.
    """
    if inputs.ndim != 3 or targets.shape != inputs.shape or loss_mask.shape != inputs.shape:
        raise ValueError(f"rl.dpo.sequence_logprobs: inputs {tuple(inputs.shape)}, targets {tuple(targets.shape)} "
                         f"and loss_mask {tuple(loss_mask.shape)} must all be [B, K, T]")
    b, k, t = inputs.shape
    flat_prefix = None if prefix_len is None else prefix_len.reshape(b * k)
    logits = Transformer(cfg).apply({"params": params}, inputs.reshape(b * k, t), prefix_len=flat_prefix,
                                    rngs=dropout_rngs(cfg, rng))
    if temperature != 1.0:
        logits = logits / temperature
    tok_logp = token_log_probs(logits, targets.reshape(b * k, t))
    return (tok_logp * loss_mask.reshape(b * k, t).astype(jnp.float32)).sum(-1).reshape(b, k)


def _logps(cfg, params, batch, rng=None):
    return sequence_logprobs(cfg, params, batch["inputs"], batch["targets"], batch["loss_mask"],
                             batch.get("prompt_len"), rng=rng)


def dpo_loss_fn(cfg: ModelConfig, beta: float, label_smoothing: float = 0.0):
    """`loss_fn(params, batch, rng) -> (loss, metrics)` for the generic train step.

    batch: a preference batch (`inputs`, `targets`, `loss_mask` `[B, K, T]`, `ranks`, `prompt_len` `[B, K]`)
    with `ref_logps [B, K]` added by `with_reference_logps`. `metrics["weight"]` counts prompts with pairs.
    """
    def loss_fn(params, batch, rng):
        loss, metrics = ranked_dpo_loss(_logps(cfg, params, batch, rng), batch["ref_logps"], batch["ranks"], beta,
                                        label_smoothing)
        return loss, dict(metrics, loss=loss, weight=metrics["prompts"])
    return loss_fn


def with_reference_logps(dataset, cfg: ModelConfig, ref_params, mesh, rules=sharding.RULES):
    """`dataset` (a grain IterDataset of preference batches) with the frozen reference's `ref_logps [B, K]`.

    The reference runs once per batch as its own jitted forward pass, outside the policy's gradient, so
    the policy step needs only the policy (TRL's `precompute_ref_log_probs`, done on the fly). The map keeps
    the dataset's checkpointable position.
    """
    keys = ("inputs", "targets", "loss_mask", "prompt_len")
    fn = jax.jit(lambda p, b: _logps(cfg, p, b), out_shardings=sharding.batch_sharding(mesh, 2, rules))
    axes = sharding.batch_axes(rules) or None

    def add(batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            out = fn(ref_params, sharding.global_batch({k: batch[k] for k in keys if k in batch}, mesh, rules))
        local = multihost_utils.global_array_to_host_local_array(out, mesh, P(axes, None))
        return dict(batch, ref_logps=np.asarray(local, np.float32))

    return dataset.map(add)

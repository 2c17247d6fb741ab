"""Language-model objectives as pure functions of arrays, and the `loss_fn(params, batch, rng)` built on them.

A batch follows the project convention: `inputs`, `targets` int32 [B, T], `loss_mask` f32 [B, T] and the
optional `positions`, `segment_ids`, `prefix_len`. Pretraining (causal or GLM blank infilling) and SFT share
one loss: the data pipeline decides which tokens count (SFT masks the prompt, GLM counts part B only).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lm.model import Transformer, dropout_rngs

MODEL_KWARGS = ("positions", "segment_ids", "prefix_len")


def _target_logit_and_logsumexp(logits, targets):
    """`(logits[target], logsumexp(logits), max(logits))`, each `[B, T]`, in float32.

    A one-hot select instead of a gather, and a max shift outside the gradient, keep the backward pass a
    single fused elementwise `softmax - onehot` over the `[B, T, V]` logits (no scatter, no extra passes).
    """
    logits = logits.astype(jnp.float32)
    top = jax.lax.stop_gradient(logits.max(axis=-1))
    lse = top + jnp.log(jnp.exp(logits - top[..., None]).sum(axis=-1))
    hit = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    return jnp.where(hit, logits, 0.0).sum(axis=-1), lse, top


def token_log_probs(logits, targets):
    """log p(targets) under `logits`: `[B, T, V] x [B, T] -> [B, T]`, computed in float32."""
    target_logit, lse, _ = _target_logit_and_logsumexp(logits, targets)
    return target_logit - lse


def lm_loss(logits, targets, loss_mask):
    """Mean next-token cross-entropy over the tokens where `loss_mask` is 1.

    Returns `(loss, metrics)`; metrics hold `loss`, `accuracy` (the target has the highest logit, over
    counted tokens) and `weight` (number of counted tokens), which the train step uses to average
    micro-batches exactly.
    """
    target_logit, lse, top = _target_logit_and_logsumexp(logits, targets)
    mask = loss_mask.astype(jnp.float32)
    weight = mask.sum()
    denom = jnp.maximum(weight, 1.0)
    loss = ((lse - target_logit) * mask).sum() / denom
    accuracy = ((target_logit >= top).astype(jnp.float32) * mask).sum() / denom
    return loss, {"loss": loss, "accuracy": accuracy, "weight": weight}


def model_kwargs(batch, cfg=None) -> dict:
    """The optional model inputs (`positions`, `segment_ids`, `prefix_len`) present in a batch.

    With a 2D-RoPE model (`cfg.position == "rope2d"`), 1D positions `[B, T]` (causal or SFT data) become
    `(position, 0)` pairs: every token sits in "part A", as in GLM's own causal use.
    """
    out = {k: batch[k] for k in MODEL_KWARGS if k in batch}
    pos = out.get("positions")
    if cfg is not None and cfg.position == "rope2d" and pos is not None and pos.ndim == 2:
        out["positions"] = jnp.stack([pos, jnp.zeros_like(pos)], axis=-1)
    return out


def lm_loss_fn(model: Transformer) -> Callable:
    """`loss_fn(params, batch, rng) -> (loss, metrics)` of `model` on an LM batch (pretraining and SFT)."""

    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch["inputs"], rngs=dropout_rngs(model.cfg, rng),
                             **model_kwargs(batch, model.cfg))
        return lm_loss(logits, batch["targets"], batch["loss_mask"])

    return loss_fn

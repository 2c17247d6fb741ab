"""AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask, all from optax."""
from __future__ import annotations

import logging
from typing import Sequence

import jax
import optax

NO_DECAY_KINDS = ("norms", "biases", "embeddings")


def _names(path) -> list[str]:
    """Dict keys along a pytree path (skips the `.value` of boxed leaves)."""
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def param_kind(path) -> str:
    """"norms", "biases", "embeddings" or "weights" for the parameter at `path` of a Transformer param tree."""
    names = _names(path)
    if any(n.endswith("norm") for n in names[:-1]):
        return "norms"
    if names and names[-1] == "bias":
        return "biases"
    if names and (names[-1] == "embedding" or names[-1] == "pos_embed"):
        return "embeddings"
    return "weights"


def decay_mask(params, no_decay: Sequence[str] = NO_DECAY_KINDS):
    """Tree of bools, True where weight decay applies: every parameter whose kind is not in `no_decay`."""
    unknown = set(no_decay) - set(NO_DECAY_KINDS)
    if unknown:
        raise ValueError(f"optim.no_decay has unknown kind(s) {sorted(unknown)}; known: {NO_DECAY_KINDS}")
    return jax.tree_util.tree_map_with_path(lambda p, _: param_kind(p) not in no_decay, params)


def schedule(cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.lr` over `cfg.warmup_steps`, then cosine to `cfg.lr * cfg.end_lr_ratio`.

    A run shorter than its warmup (e.g. `--config.train.steps=20` on a preset) warms up over a tenth of it.
    """
    decay = cfg.decay_steps or total_steps
    warmup = cfg.warmup_steps
    if warmup >= decay:
        warmup = decay // 10
        logging.warning("optim.warmup_steps=%d >= %d decay steps: warming up over %d steps instead",
                        cfg.warmup_steps, decay, warmup)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, decay, cfg.lr * cfg.end_lr_ratio)


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(tx, lr_schedule)` from an `optim` config section (see configs/common.py for the fields)."""
    lr = schedule(cfg, total_steps)
    no_decay = tuple(cfg.no_decay)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=lambda p: decay_mask(p, no_decay)),
    )
    return tx, lr

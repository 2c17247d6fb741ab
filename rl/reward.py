"""Reward model: InstructGPT's K-wise ranking loss, scoring with the scalar head, init from SFT, normalisation.

A reward model is `lm.Transformer(cfg, head="scalar")`; the score of a response is the head's value at its
last non-pad token. Preference batches hold K responses per prompt: `tokens [B, K, T]`, `ranks [B, K]`
(0 = best, equal ranks = tie, -1 = absent response) and `last_index [B, K]`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp

from lm import runs
from lm.config import ModelConfig
from lm.losses import lm_loss
from lm.model import Transformer, dropout_rngs, with_score_head


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Reward-model recipe beside its training loop (configs/reward.py's `reward` section is built from it).

    Attributes:
      head_init: the new scalar head: "normal" (the model's initialiser) or "zeros".
      normalize: after training, score every training response once and save their mean and std
        (`reward_norm.json`), so that `load` gives scores with mean 0 and std 1 on the SFT policy's
        responses, as InstructGPT normalises its reward model before RL.
      normalize_batches: at most this many batches of that pass (a cap for large data); 0 = all of it.
      lm_coef: weight of a next-token loss on the best-ranked responses added to the ranking loss, which keeps
        the language-model head and so the trunk's knowledge of the SFT model (the SFT-regularised "generalisable
        reward model" of Yang et al. 2024, who use 0.01-0.1 of it). The run then trains head "lm+scalar" and
        `load` gives its scalar model without the LM head. 0 = the plain ranking loss (InstructGPT).
    """
    head_init: str = "normal"
    normalize: bool = True
    normalize_batches: int = 0
    lm_coef: float = 0.0

    def __post_init__(self):
        if self.head_init not in ("normal", "zeros"):
            raise ValueError(f"reward.head_init={self.head_init!r} must be 'normal' or 'zeros'")
        if not self.lm_coef >= 0:
            raise ValueError(f"reward.lm_coef={self.lm_coef} must be >= 0")

    @property
    def head(self) -> str:
        """The model trained: "scalar", or "lm+scalar" when the loss has the LM term."""
        return "lm+scalar" if self.lm_coef else "scalar"


def ranking_loss(scores, ranks):
    """InstructGPT's ranking loss over all C(K, 2) pairs of each prompt; returns `(loss, metrics)`.

    scores: float `[B, K]`; ranks: int `[B, K]` (0 = best, equal = tie, -1 = absent). Every untied pair of
    present responses enters `-log sigmoid(r_w - r_l)`; a prompt's loss is the mean over its untied pairs and
    the batch loss the mean over prompts that have at least one, so each prompt weighs the same (InstructGPT
    treats a prompt's comparisons as one batch element). Metrics, pooled over all pairs of the batch:
    `accuracy` (fraction with r_w > r_l), `margin` (mean r_w - r_l), `pairs` (their number) and `prompts`
    (prompts with at least one untied pair).
    """
    if scores.ndim != 2 or scores.shape != ranks.shape:
        raise ValueError(f"rl.reward.ranking_loss: scores {tuple(scores.shape)} and ranks {tuple(ranks.shape)} "
                         "must both be [B, K]")
    if not jnp.issubdtype(ranks.dtype, jnp.integer):
        raise ValueError(f"rl.reward.ranking_loss: ranks must be integers, got {ranks.dtype}")
    scores = scores.astype(jnp.float32)
    present = ranks >= 0
    # pair (i, j) counts when both are present and i is strictly better (lower rank) than j.
    better = (ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None] & present[:, None, :]
    pair = better.astype(jnp.float32)  # [B, K, K]
    diff = scores[:, :, None] - scores[:, None, :]  # r_i - r_j
    n_pairs = pair.sum((1, 2))  # [B]
    prompt_loss = (-jax.nn.log_sigmoid(diff) * pair).sum((1, 2)) / jnp.maximum(n_pairs, 1.0)
    has_pairs = (n_pairs > 0).astype(jnp.float32)
    loss = (prompt_loss * has_pairs).sum() / jnp.maximum(has_pairs.sum(), 1.0)
    total = jnp.maximum(pair.sum(), 1.0)
    metrics = {"accuracy": ((diff > 0) * pair).sum() / total, "margin": (diff * pair).sum() / total,
               "pairs": pair.sum(), "prompts": has_pairs.sum()}
    return loss, metrics


def score_responses(cfg: ModelConfig, params, tokens, last_index, prefix_len=None, rng=None, lm_logits=False):
    """Scores `[B, K]` of K responses per prompt, all in one forward pass of the scalar-head model.

    tokens: int `[B, K, T]` (prompt + response, right-padded); last_index: int `[B, K]`, position of each
    response's last non-pad token; prefix_len: optional int `[B, K]` for prefix-LM models (GLM).
    rng: dropout key of a training pass (LoRA dropout); None is deterministic.
    lm_logits: params of head "lm+scalar"; returns `(scores, logits [B, K, T, V])` of the same pass.
    """
    if tokens.ndim != 3 or last_index.shape != tokens.shape[:2]:
        raise ValueError(f"rl.reward.score_responses: tokens {tuple(tokens.shape)} must be [B, K, T] and "
                         f"last_index {tuple(last_index.shape)} [B, K]")
    b, k, t = tokens.shape
    flat_prefix = None if prefix_len is None else prefix_len.reshape(b * k)
    out = Transformer(cfg, head="lm+scalar" if lm_logits else "scalar").apply(
        {"params": params}, tokens.reshape(b * k, t), prefix_len=flat_prefix, rngs=dropout_rngs(cfg, rng))
    logits, values = out if lm_logits else (None, out)  # values [B*K, T]
    idx = last_index.reshape(b * k, 1).astype(jnp.int32)
    scores = jnp.take_along_axis(values, idx, axis=1).reshape(b, k)
    return (scores, logits.reshape(b, k, t, -1)) if lm_logits else scores


def reward_loss_fn(cfg: ModelConfig, lm_coef: float = 0.0):
    """`loss_fn(params, batch, rng) -> (loss, metrics)` for the generic train step on preference batches.

    batch (lm.data.preference_dataset): `tokens [B, K, T]`, `ranks [B, K]`, `last_index [B, K]`, and
    `prompt_len [B, K]` (the bidirectional prefix of prefix-LM models). `metrics["weight"]` is the number of
    prompts with at least one untied pair, so accumulated micro-batches average exactly as one batch.
    lm_coef > 0 (`RewardConfig.lm_coef`; params of head "lm+scalar") adds that times the next-token loss on the
    responses ranked best (`targets`, `loss_mask` of the batch; a tie for best counts each), reported as
    `lm_loss` beside the ranking loss `rank_loss`.
    """
    def loss_fn(params, batch, rng):
        out = score_responses(cfg, params, batch["tokens"], batch["last_index"], batch.get("prompt_len"), rng,
                              lm_logits=bool(lm_coef))
        scores = out[0] if lm_coef else out
        loss, metrics = ranking_loss(scores, batch["ranks"])
        present = batch["ranks"] >= 0
        metrics["score_mean"] = (scores * present).sum() / jnp.maximum(present.sum(), 1)
        if lm_coef:
            best = (batch["ranks"] == 0)[..., None]
            lm, _ = lm_loss(out[1], batch["targets"], batch["loss_mask"] * best)
            metrics.update(rank_loss=loss, lm_loss=lm)
            loss = loss + lm_coef * lm
        metrics["loss"] = loss
        metrics["weight"] = metrics["prompts"]
        return loss, metrics
    return loss_fn


def init_from_sft(cfg: ModelConfig, sft_params, rng, head_init: str = "normal", head: str = "scalar"):
    """Scalar-head parameters whose trunk is a copy of `sft_params` and whose `score` head is new
    (lm.model.with_score_head; the language-model head `lm_head` is dropped, or kept with head "lm+scalar").

    head_init: "normal" (the model's initialiser, for a reward model) or "zeros" (a critic that starts at 0).
    """
    if head_init not in ("normal", "zeros"):
        raise ValueError(f"rl.reward.init_from_sft: head_init must be 'normal' or 'zeros', got {head_init!r}")
    return with_score_head(cfg, sft_params, rng, head, zeros=head_init == "zeros")


def normalize_head(params, mean, std, eps: float = 1e-6):
    """Fold a bias and gain into the score head so that scores become `(s - mean) / std`.

    With `mean`/`std` measured on the SFT policy's responses, the normalised model scores them with mean 0
    and standard deviation 1 (as InstructGPT does before RL). The head stays linear, so no extra op is needed.
    """
    gain = 1.0 / (jnp.asarray(std, jnp.float32) + eps)
    score = params["score"]
    new = {"kernel": (score["kernel"] * gain).astype(score["kernel"].dtype),
           "bias": ((score["bias"] - mean) * gain).astype(score["bias"].dtype)}
    return {**params, "score": new}


NORM_FILE = "reward_norm.json"


def save_normalization(workdir: str, mean: float, std: float, count: int) -> str:
    """Write the score statistics of the SFT policy's responses to `WORKDIR/reward_norm.json`."""
    path = os.path.join(workdir, NORM_FILE)
    with open(path, "w") as f:
        json.dump({"mean": mean, "std": std, "count": count}, f)
    return path


def load(run_dir: str, *, cfg: Optional[ModelConfig] = None, mesh=None, rules=None, normalize: bool = True):
    """`(ModelConfig, params)` of a trained reward model: a reward run's newest intact checkpoint, or a Hugging
    Face `*ForSequenceClassification` directory (e.g. exported by `python -m experiments.export`).

    Params land on `mesh` under `rules`, in the layout of `cfg` when given (lm.runs.load). With `normalize` and
    a `reward_norm.json` in the run directory, the head is rescaled (`normalize_head`) so the SFT policy's
    responses score with mean 0, std 1.
    """
    cfg, params, _ = runs.load(run_dir, mesh=mesh, rules=rules, head="scalar", cfg=cfg)
    if cfg.num_labels != 1:
        raise ValueError(f"{run_dir} is a classifier with {cfg.num_labels} labels, not a reward model (one score)")
    return cfg, normalized(run_dir, params) if normalize else params


def normalized(run_dir: str, params):
    """`params` (a reward model's, or its trainable leaves with the `score` head) with the head rescaled by
    the run's `reward_norm.json` (`normalize_head`); unchanged when the run has none."""
    norm = os.path.join(runs.home(run_dir), NORM_FILE)
    if not os.path.exists(norm):
        return params
    with open(norm) as f:
        stats = json.load(f)
    return normalize_head(params, stats["mean"], stats["std"])

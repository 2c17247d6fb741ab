"""Classification as GPT-1 fine-tunes it (Radford et al. 2018, section 3.3): the pretrained decoder, and a linear
layer on the final hidden state of each row's last token, trained with softmax cross-entropy; optionally with the
language-modelling loss on the same text as an auxiliary objective (GPT-1: `L3 = L2 + 0.5 * L1`).

The classifier is `Transformer(cfg, head="scalar")` with `cfg.num_labels` outputs, or `head="lm+scalar"` when the
auxiliary loss needs the language-model head as well. Batches (lm.data.classify_dataset): `inputs` int32 `[B, T]`
(right-padded), `last_index` int32 `[B]` (the final token, where the label is read), `labels` int32 `[B]` (-1:
a padding row) and `targets` / `loss_mask` `[B, T]` for the auxiliary loss.

Labels in the data are class ids (ints) or names (strings); `lm.data.schemas.label_names` fixes the run's
classes once, and `label_id` maps each row's label onto them. A run keeps its class names in its checkpoint
metadata (`labels`, read by lm.runs.labels), so evaluation and export (`id2label`) use the mapping it trained with.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.losses import lm_loss, model_kwargs
from lm.model import Transformer, dropout_rngs


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifyConfig:
    """The classification recipe (configs/classify.py's `classify` section is built from it).

    Attributes:
      aux_lm_coef: weight of the language-modelling loss on each row's tokens, added to the classification
        loss (GPT-1's lambda = 0.5; its ablation found the auxiliary objective helps the larger data sets, NLI
        and QQP, not the smaller ones); 0 trains the classifier alone, as `*ForSequenceClassification`
        fine-tuning does, and keeps no LM head.
    """
    aux_lm_coef: float = 0.0

    def __post_init__(self):
        if self.aux_lm_coef < 0:
            raise ValueError(f"classify.aux_lm_coef={self.aux_lm_coef} must be >= 0")

    @property
    def head(self) -> str:
        """The Transformer head of the classifier: the score head alone, or beside the LM head."""
        return "lm+scalar" if self.aux_lm_coef else "scalar"


def classification_loss(logits, labels):
    """Mean softmax cross-entropy of class logits `[B, N]` against `labels` int `[B]`, over rows with a label
    (`labels >= 0`; -1 marks padding rows). Returns `(loss, metrics)` with `loss`, `accuracy` (the label has the
    largest logit) and `weight` (labelled rows, so micro-batches and evaluation batches average exactly)."""
    present = labels >= 0  # lm.losses.lm_loss over one position per row, the label its target
    return lm_loss(logits[:, None, :], jnp.where(present, labels, 0)[:, None], present[:, None])


def class_logits(cfg: ModelConfig, params, batch, rng=None, head: str = "scalar"):
    """`(class logits [B, N] at each row's last_index, LM logits [B, T, V] or None)` of a classification batch.

    head "lm+scalar" also returns the language-model logits (one forward pass for both). rng: dropout key of a
    training pass (LoRA dropout); None is deterministic.
    """
    out = Transformer(cfg, head=head).apply({"params": params}, batch["inputs"], rngs=dropout_rngs(cfg, rng),
                                            **model_kwargs(batch, cfg))
    lm_logits, scores = out if head == "lm+scalar" else (None, out)  # scores [B, T, N]
    rows = jnp.arange(scores.shape[0])
    return scores[rows, batch["last_index"]], lm_logits


def classify_loss_fn(cfg: ModelConfig, aux_lm_coef: float = 0.0):
    """`loss_fn(params, batch, rng) -> (loss, metrics)` for the generic train step on classification batches:
    `classification_loss` at each row's last token, plus `aux_lm_coef` times the LM loss on the row's tokens
    (then `cls_loss` and `lm_loss` are reported too; the params must have the LM head: head "lm+scalar").

    The score head's bias is held at its initial 0: GPT-1's `W_y` (its eq. 3) and transformers' `score` layer
    have none, so a trained classifier exports exactly (lm.hf.save).
    """
    head = ClassifyConfig(aux_lm_coef=aux_lm_coef).head

    def loss_fn(params, batch, rng):
        score = dict(params["score"], bias=jax.lax.stop_gradient(params["score"]["bias"]))
        logits, lm_logits = class_logits(cfg, dict(params, score=score), batch, rng, head)
        loss, metrics = classification_loss(logits, batch["labels"])
        if lm_logits is not None:
            aux, _ = lm_loss(lm_logits, batch["targets"], batch["loss_mask"])
            metrics = dict(metrics, cls_loss=loss, lm_loss=aux)
            loss = loss + aux_lm_coef * aux
            metrics["loss"] = loss
        return loss, metrics

    return loss_fn

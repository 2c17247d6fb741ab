"""Text embeddings from any trained model: its final normalised hidden states pooled over a text, and
zero-shot classification by cosine similarity to label descriptions ("a good review" / "a bad review"), no
training.

Texts of any lengths are right-padded to power-of-two widths (`lm.generation.bucket_length`), sorted by
length so each batch is narrow, and the forward pass is jitted once per (config, batch rows, width). A row's
vector depends only on its own tokens: the model is causal (or, for `mask="prefix"`, bidirectional over
exactly the row's tokens: `prefix_len` = its length), so right padding and other rows never reach it.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import ModelConfig
from lm.generation import bucket_length, pad_prompts
from lm.model import Transformer

POOLINGS = ("mean", "last")


@functools.partial(jax.jit, static_argnames=("cfg", "head", "pooling"))
def _pooled(cfg: ModelConfig, params, tokens, lengths, *, head: str, pooling: str):
    """float32 `[B, d_model]`: hidden states of right-padded `tokens [B, W]` pooled over `lengths [B]` tokens."""
    prefix_len = lengths if cfg.mask == "prefix" else None
    _, hidden = Transformer(cfg, head=head).apply({"params": params}, tokens, prefix_len=prefix_len,
                                                  return_hidden=True)  # the unused logits are never computed
    hidden = hidden.astype(jnp.float32)  # [B, W, d_model]
    if pooling == "last":
        return jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    real = jnp.arange(tokens.shape[1])[None, :, None] < lengths[:, None, None]  # [B, W, 1]
    return jnp.sum(jnp.where(real, hidden, 0.0), axis=1) / lengths[:, None].astype(jnp.float32)


def embed(cfg: ModelConfig, params, token_lists: Sequence[Sequence[int]], pooling: str = "mean",
          normalize: bool = False, batch_size: int = 64) -> np.ndarray:
    """float32 `[B, d_model]` embeddings of B token lists (lengths may differ) by a `Transformer(cfg)`.

    pooling: "mean" over a row's tokens of the final normalised hidden states, or "last": the hidden state
    at its last token. normalize: scale each vector to unit L2 norm. params: an "lm" or "scalar" (reward)
    model's. Raises ValueError for an empty list or row, ids outside the vocabulary, a row longer than
    `cfg.max_len` (less prompt/prefix tuning tokens) or an unknown pooling.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"embed: pooling must be one of {POOLINGS}, got {pooling!r}")
    if len(token_lists) == 0:
        raise ValueError("embed: token_lists is empty; give at least one token list")
    if batch_size < 1:
        raise ValueError(f"embed: batch_size must be >= 1, got {batch_size}")
    room = cfg.max_len - cfg.virtual_tokens
    rows = [np.asarray(r, np.int64).reshape(-1) for r in token_lists]
    for b, r in enumerate(rows):
        if r.size == 0:
            raise ValueError(f"embed: row {b} is empty")
        if r.size > room:
            raise ValueError(f"embed: row {b} has {r.size} tokens, more than {room} (cfg.max_len less prompt/prefix "
                             "tuning tokens)")
        bad = r[(r < 0) | (r >= cfg.vocab_size)]
        if bad.size:
            raise ValueError(f"embed: row {b} has token ids {bad[:5].tolist()} outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
    head = "scalar" if "score" in params else "lm"
    per_call = min(batch_size, 1 << (len(rows) - 1).bit_length())  # few distinct batch shapes to compile
    order = np.argsort([r.size for r in rows], kind="stable")  # similar lengths share a batch, so its width
    out = np.zeros((len(rows), cfg.d_model), np.float32)
    for start in range(0, len(rows), per_call):
        idx = order[start:start + per_call]
        batch = [rows[i] for i in idx] + [rows[idx[0]]] * (per_call - len(idx))  # filler rows, dropped below
        tokens, lengths = pad_prompts(batch, min(bucket_length(max(r.size for r in batch)), room))
        pooled = _pooled(cfg, params, jnp.asarray(tokens), jnp.asarray(lengths), head=head, pooling=pooling)
        out[idx] = np.asarray(pooled)[:len(idx)]
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


def zero_shot(cfg: ModelConfig, params, token_lists: Sequence[Sequence[int]],
              label_token_lists: Sequence[Sequence[int]], pooling: str = "mean", batch_size: int = 64) -> np.ndarray:
    """int `[B]`: for each text, the index of the label description (one token list per label) whose
    embedding is closest to the text's in cosine similarity."""
    texts = embed(cfg, params, token_lists, pooling, normalize=True, batch_size=batch_size)  # [B, d_model]
    labels = embed(cfg, params, label_token_lists, pooling, normalize=True, batch_size=batch_size)  # [L, d_model]
    return np.argmax(texts @ labels.T, axis=-1)

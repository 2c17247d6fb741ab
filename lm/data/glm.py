"""GLM autoregressive blank infilling (Du et al., 2022, "GLM: General Language Model Pretraining with
Autoregressive Blank Infilling"), as a pure NumPy function of a token array and a random generator.

From a text `x` we cut spans and replace each by one `[MASK]` (part A, seen bidirectionally), then append
the spans in a random order (part B), each opened by `[sop]` as input and closed by `[eop]` as target, and
generated left to right. Or, with probability `gmask_prob`, one trailing span of 50-100% of the text is cut
and marked `[gMASK]` (the generation objective). 2D positions: the first component is a token's position
in part A (for part B, the position of its span's mask token), the second is 0 in part A and 1, 2, ...
inside each span of part B (`[sop]` is 1).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class GlmTokens(NamedTuple):
    """The four special ids blank infilling needs."""
    mask: int
    gmask: int
    sop: int
    eop: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "GlmTokens":
        """The ids of an `lm.tokenizer.Tokenizer`, or of a checkpoint's tokenizer that has GLM's tokens under
        one of the names in `GLM_PIECES` (ChatGLM's are `[MASK]`, `[gMASK]`, `<sop>`, `<eop>`)."""
        if hasattr(tokenizer, "mask_id"):
            return cls(tokenizer.mask_id, tokenizer.gmask_id, tokenizer.sop_id, tokenizer.eop_id)
        ids = {name: next((i for p in pieces if (i := tokenizer.token_id(p)) is not None), None)
               for name, pieces in GLM_PIECES.items()}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer {tokenizer.path} lacks GLM's {missing} tokens (looked for "
                             f"{[GLM_PIECES[m] for m in missing]}): blank infilling needs them; use data.objective="
                             "'causal' or a tokenizer that has them")
        return cls(**ids)


# Names GLM's special tokens go by in released tokenizers, tried in order.
GLM_PIECES = {"mask": ("[MASK]",), "gmask": ("[gMASK]",), "sop": ("[sop]", "<sop>", "sop"),
              "eop": ("[eop]", "<eop>", "eop")}


def sample_spans(n: int, rng: np.random.Generator, *, mask_ratio: float = 0.15, poisson_lambda: float = 3.0,
                 max_spans: int | None = None) -> list[tuple[int, int]]:
    """Non-overlapping, non-adjacent `(start, length)` spans of `range(n)`, sorted by start.

    Lengths are Poisson(`poisson_lambda`) draws (at least 1), drawn until `round(mask_ratio * n)` tokens
    (at least one) are covered; the last span is cut to hit that count exactly. `max_spans` (from a length
    budget) stops early, leaving the ratio a little lower. Placement is uniform among arrangements:
    the spans are dropped into distinct gaps between the unmasked tokens.
    """
    if n <= 0:
        raise ValueError(f"cannot mask an empty sequence (n={n})")
    target = max(1, int(round(mask_ratio * n)))
    lengths = []
    while sum(lengths) < target and (max_spans is None or len(lengths) < max_spans):
        # Spans stay separated by unmasked tokens: m spans need at least m - 1 of them.
        room = n - sum(lengths) - len(lengths)
        if room < 1:
            break
        length = max(1, int(rng.poisson(poisson_lambda)))
        lengths.append(min(length, target - sum(lengths), room))
    if not lengths:
        raise ValueError(f"no room for a single span (n={n}, max_spans={max_spans})")
    unmasked = n - sum(lengths)
    gaps = np.sort(rng.choice(unmasked + 1, size=len(lengths), replace=False))
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return [(int(g + o), int(l)) for g, o, l in zip(gaps, offsets, lengths)]


def blank_infilling(tokens: np.ndarray, rng: np.random.Generator, ids: GlmTokens, *, mask_ratio: float = 0.15,
                    poisson_lambda: float = 3.0, gmask_prob: float = 0.0, max_len: int | None = None) -> dict:
    """One GLM training example from a 1-D token array.

    Args:
      tokens: int `[n]`, the original text.
      rng: NumPy generator (all randomness comes from it).
      ids: special token ids (`GlmTokens.from_tokenizer(tok)`).
      mask_ratio: share of tokens masked in `[MASK]` mode.
      poisson_lambda: mean span length in `[MASK]` mode.
      gmask_prob: probability of `[gMASK]` mode (one trailing span of U[50%, 100%] of the text).
      max_len: longest output; the result has `n + 2 * num_spans` tokens, so `[MASK]` mode stops adding
        spans at this budget and `[gMASK]` mode needs `n + 2 <= max_len`.

    Returns:
      dict with `inputs`, `targets` int32 `[N]`, `loss_mask` float32 `[N]` (1 exactly on part B),
      `positions` int32 `[N, 2]`, `prefix_len` int (length of part A), `mode` "mask" or "gmask".
      Part B targets are each span's tokens followed by `[eop]`: every masked token is predicted once.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    n = len(tokens)
    if max_len is not None and n + 2 > max_len:
        raise ValueError(f"{n} tokens need at least {n + 2} positions after infilling, max_len={max_len}")
    if rng.random() < gmask_prob:
        length = int(rng.integers(max(1, (n + 1) // 2), n + 1))
        spans, mask_id, mode = [(n - length, length)], ids.gmask, "gmask"
    else:
        max_spans = None if max_len is None else (max_len - n) // 2
        spans = sample_spans(n, rng, mask_ratio=mask_ratio, poisson_lambda=poisson_lambda, max_spans=max_spans)
        mask_id, mode = ids.mask, "mask"

    part_a, mask_pos, cursor = [], [], 0
    for start, length in spans:
        part_a.append(tokens[cursor:start])
        mask_pos.append(sum(len(p) for p in part_a))
        part_a.append(np.asarray([mask_id], np.int32))
        cursor = start + length
    part_a.append(tokens[cursor:])
    part_a = np.concatenate(part_a)
    a = len(part_a)

    inputs, targets, pos1, pos2 = [part_a], [np.zeros(a, np.int32)], [np.arange(a)], [np.zeros(a, np.int64)]
    for k in rng.permutation(len(spans)):
        start, length = spans[k]
        span = tokens[start:start + length]
        inputs.append(np.concatenate([[ids.sop], span]))
        targets.append(np.concatenate([span, [ids.eop]]))
        pos1.append(np.full(length + 1, mask_pos[k]))
        pos2.append(np.arange(1, length + 2))
    inputs = np.concatenate(inputs).astype(np.int32)
    return {
        "inputs": inputs,
        "targets": np.concatenate(targets).astype(np.int32),
        "loss_mask": (np.arange(len(inputs)) >= a).astype(np.float32),
        "positions": np.stack([np.concatenate(pos1), np.concatenate(pos2)], axis=-1).astype(np.int32),
        "prefix_len": a,
        "mode": mode,
    }

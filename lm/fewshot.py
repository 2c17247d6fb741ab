"""Few-shot (in-context) evaluation of a language model: GPT-3's zero-, one- and few-shot prompting.

A k-shot prompt is k solved demonstrations, then the question asked, as plain text (the pretrained model's
format, no chat template): `template.format(question=q)` + `answer_prefix` + answer for each demonstration,
joined by `separator`. The demonstrations never include the question asked (no demonstration leaks its
answer). Two scorers:
  - log-likelihood of candidate continuations (multiple choice): `loglikelihood` gives lm-eval's
    `(sum of log p(continuation | context), is the continuation the greedy one)` per pair, and
    `multiple_choice` the most likely candidate of each question;
  - generation: `lm.generate` on the prompts, graded by the caller (e.g. the QA task's labeler).
"""
from __future__ import annotations

import dataclasses
import functools
import random
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm.generation import bucket_length
from lm.losses import token_log_probs
from lm.model import Transformer


@dataclasses.dataclass(frozen=True)
class Example:
    """A question, its reference answer, and for multiple choice the candidate answers (one is `answer`)."""
    question: str
    answer: str
    choices: tuple = ()


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How examples become text: `template` holds `{question}`; an answer follows `answer_prefix`."""
    template: str = "Question: {question}"
    answer_prefix: str = "\nAnswer:"
    separator: str = "\n\n"

    def demonstration(self, ex: Example) -> str:
        return self.template.format(question=ex.question) + self.answer_prefix + " " + ex.answer

    def query(self, ex: Example) -> str:
        return self.template.format(question=ex.question) + self.answer_prefix


def kshot_prompts(examples: Sequence[Example], pool: Sequence[Example], k: int, *, seed: int = 0,
                  fmt: PromptFormat = PromptFormat()) -> list[str]:
    """A k-shot prompt for each of `examples`, its k demonstrations drawn (seeded, per example) from `pool`
    among those that do not ask the same question. k=0 gives the bare query."""
    if k < 0:
        raise ValueError(f"kshot_prompts: k must be >= 0, got {k}")
    out = []
    for i, ex in enumerate(examples):
        candidates = [d for d in pool if d.question != ex.question]
        if len(candidates) < k:
            raise ValueError(f"kshot_prompts: {k} demonstrations asked for, but the pool has {len(candidates)} "
                             f"other than {ex.question!r}")
        demos = random.Random(f"{seed}/{i}").sample(candidates, k)
        out.append(fmt.separator.join([fmt.demonstration(d) for d in demos] + [fmt.query(ex)]))
    return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _continuation_logprobs(cfg, params, tokens, mask):
    logits = Transformer(cfg).apply({"params": params}, tokens[:, :-1])
    logp = token_log_probs(logits, tokens[:, 1:])
    greedy = jnp.argmax(logits, -1) == tokens[:, 1:]
    m = mask[:, 1:]
    return (logp * m).sum(-1), jnp.all(greedy | (m == 0), axis=-1)


def loglikelihood(cfg, params, tok, contexts: Sequence[str], continuations: Sequence[str], *,
                  batch_size: int = 32, bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`(log p(continuation | context) [N], is_greedy [N])`, lm-eval's `loglikelihood` for each pair.

    The two texts are tokenised separately and joined (the continuation's tokens are exactly those scored);
    `bos` starts each row with the tokenizer's BOS. Rows are right-padded to a power-of-two width, so similar
    lengths reuse one compiled forward pass; a row's result does not depend on the other rows.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"loglikelihood: {len(contexts)} contexts but {len(continuations)} continuations")
    rows, starts = [], []
    for c, x in zip(contexts, continuations):
        ctx = tok.encode(c, bos=bos)
        cont = tok.encode(x)
        if not cont:
            raise ValueError(f"loglikelihood: the continuation {x!r} has no tokens")
        rows.append(ctx + cont)
        starts.append(len(ctx))
    if rows and max(map(len, rows)) > cfg.max_len + 1:
        raise ValueError(f"loglikelihood: a context + continuation takes {max(map(len, rows))} tokens, more than "
                         f"the model's max_len {cfg.max_len} + 1")
    ll, greedy = np.zeros(len(rows), np.float64), np.zeros(len(rows), bool)
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo:lo + batch_size]
        width = min(bucket_length(max(map(len, chunk))), cfg.max_len + 1)
        tokens = np.full((batch_size, width), tok.pad_id, np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        for j, (r, s) in enumerate(zip(chunk, starts[lo:lo + batch_size])):
            tokens[j, :len(r)] = r
            mask[j, s:len(r)] = 1.0
        a, b = jax.device_get(_continuation_logprobs(cfg, params, tokens, mask))
        ll[lo:lo + len(chunk)], greedy[lo:lo + len(chunk)] = a[:len(chunk)], b[:len(chunk)]
    return ll, greedy


def multiple_choice(cfg, params, tok, prompts: Sequence[str], examples: Sequence[Example], *,
                    batch_size: int = 32) -> dict:
    """Pick each example's most likely choice after its prompt; `{"accuracy", "predictions"}` (lm-eval's
    `acc`: the summed log-probability, no length normalisation)."""
    if len(prompts) != len(examples) or any(ex.answer not in ex.choices for ex in examples):
        raise ValueError("multiple_choice: one prompt per example, and every example's answer among its choices")
    contexts = [p for p, ex in zip(prompts, examples) for _ in ex.choices]
    ll, _ = loglikelihood(cfg, params, tok, contexts, [" " + c for ex in examples for c in ex.choices],
                          batch_size=batch_size)
    bounds = np.cumsum([0] + [len(ex.choices) for ex in examples])
    picks = [ex.choices[int(np.argmax(ll[a:b]))] for ex, a, b in zip(examples, bounds[:-1], bounds[1:])]
    correct = [p == ex.answer for p, ex in zip(picks, examples)]
    return {"accuracy": float(np.mean(correct)) if correct else float("nan"), "predictions": picks}

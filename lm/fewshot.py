"""Few-shot (in-context) evaluation of a language model: GPT-3's zero-, one- and few-shot prompting.

A k-shot prompt is k solved demonstrations, then the question asked, as plain text (the pretrained model's
format, no chat template): `template.format(question=q)` + `answer_prefix` + answer for each demonstration,
joined by `separator`. The demonstrations never include the question asked (no demonstration leaks its
answer). Two scorers:
  - log-likelihood of candidate continuations (multiple choice): `loglikelihood` gives lm-eval's
    `(sum of log p(continuation | context), is the continuation the greedy one)` per pair of texts
    (`loglikelihood_tokens` per pair of token-id lists), and `multiple_choice` the most likely candidate of each
    question;
  - generation: `lm.generate` on the prompts, graded by the caller (e.g. the QA task's labeler).
`perplexity` measures the other side of the alignment tax: how well a model still predicts held-out pretraining
text (`lm.data.pretrain_dataset(..., split="eval", num_epochs=1)` batches).
"""
from __future__ import annotations

import dataclasses
import functools
import random
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm.generation import bucket_length
from lm.losses import lm_loss_fn, token_log_probs
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


def max_input_length(cfg) -> int:
    """Tokens one forward pass reads: `cfg.max_len` less the prompt/prefix-tuning tokens set in front of each row."""
    return cfg.max_len - cfg.virtual_tokens


def loglikelihood_tokens(cfg, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                         batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """`(log p(continuation | context) [N], is_greedy [N])` of `(context ids, continuation ids)` pairs.

    The token-level scorer under `loglikelihood` (and lm-eval's `_loglikelihood_tokens`, lm.eval_harness).
    A context needs at least one token (the first continuation token is predicted from it) and a row at most
    `max_input_length(cfg) + 1` (its last token is only predicted, never read). Rows are scored longest first,
    right-padded (with id 0: the causal mask keeps padding out of every scored position) to a power-of-two
    width, so a batch holds similar lengths and similar widths reuse one compiled forward pass; a row's result
    does not depend on the other rows.
    """
    limit = max_input_length(cfg)
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"loglikelihood_tokens: pair {i} has {len(ctx)} context and {len(cont)} continuation "
                             "tokens; each needs at least one")
        if len(ctx) + len(cont) > limit + 1:
            raise ValueError(f"loglikelihood_tokens: pair {i} takes {len(ctx) + len(cont)} tokens, more than the "
                             f"model's max_len {limit} + 1")
        rows.append((list(ctx) + list(cont), len(ctx)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    ll, greedy = np.zeros(len(rows), np.float64), np.zeros(len(rows), bool)
    for lo in range(0, len(order), batch_size):
        picked = order[lo:lo + batch_size]
        width = min(bucket_length(len(rows[picked[0]][0])), limit + 1)
        tokens = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        for j, i in enumerate(picked):
            row, start = rows[i]
            tokens[j, :len(row)] = row
            mask[j, start:len(row)] = 1.0
        a, b = jax.device_get(_continuation_logprobs(cfg, params, tokens, mask))
        ll[picked], greedy[picked] = a[:len(picked)], b[:len(picked)]
    return ll, greedy


def loglikelihood(cfg, params, tok, contexts: Sequence[str], continuations: Sequence[str], *,
                  batch_size: int = 32, bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`(log p(continuation | context) [N], is_greedy [N])`, lm-eval's `loglikelihood` for each pair.

    The two texts are tokenised separately and joined (the continuation's tokens are exactly those scored);
    `bos` starts each context with the tokenizer's BOS when it has one (GPT-NeoX's has none). Scored by
    `loglikelihood_tokens`.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"loglikelihood: {len(contexts)} contexts but {len(continuations)} continuations")
    prefix = [tok.bos_id] if bos and tok.bos_id is not None else []
    pairs = []
    for c, x in zip(contexts, continuations):
        cont = tok.encode(x)
        if not cont:
            raise ValueError(f"loglikelihood: the continuation {x!r} has no tokens")
        pairs.append((prefix + tok.encode(c), cont))
    return loglikelihood_tokens(cfg, params, pairs, batch_size=batch_size)


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


@functools.partial(jax.jit, static_argnames=("cfg",))
def _nll_sum(cfg, params, batch):
    """`(summed next-token NLL, counted tokens)` of a batch: the pretraining loss, times its weight."""
    loss, metrics = lm_loss_fn(Transformer(cfg))(params, batch, None)
    return loss * metrics["weight"], metrics["weight"]


def perplexity(cfg, params, batches: Iterable[dict]) -> dict:
    """`{"perplexity", "nll", "tokens"}`: exp of the mean next-token negative log-likelihood (nats) over the counted
    tokens (`loss_mask`) of causal LM batches (`inputs`, `targets`, `loss_mask`, optional `segment_ids` and
    `positions`), e.g. one pass over a pretraining text's held-out documents."""
    nll, tokens = 0.0, 0.0
    for batch in batches:
        a, n = jax.device_get(_nll_sum(cfg, params, {k: np.asarray(v) for k, v in batch.items()}))
        nll, tokens = nll + float(a), tokens + float(n)
    if tokens == 0:
        raise ValueError("perplexity: the batches hold no counted tokens (is the held-out split empty?)")
    return {"perplexity": float(np.exp(nll / tokens)), "nll": nll / tokens, "tokens": int(tokens)}

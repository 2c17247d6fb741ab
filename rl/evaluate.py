"""Evaluation of an RLHF run: reward-model held-out accuracy, a grader's (gold) score of policies, win rate,
KL to the reference and sample answers.

Built on the functions the trainers use: scores are `rl.reward.score_responses` (the reward model's value
at each response's eos), log-probs `rl.dpo.sequence_logprobs`, samples `lm.generate`, and rows follow the
chat template SFT trained on (`lm.data.format_prompt` + `format_response`). A grader is any
`grade(prompt, response) -> {"score": float, ...}`: a labeler program, a stronger model or human labels.
Every jitted call has a fixed batch size (the last batch is padded), so it compiles once per scoring width
and, for sampling, per power-of-two prompt width.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from lm import sharding
from lm.data.chat import format_prompt, format_response, stop_id
from lm.generation import generate
from rl.dpo import sequence_logprobs
from rl.reward import score_responses


def response_text(tok, ids) -> str:
    """A response's text: its tokens up to (not including) eos (or the chat template's end of turn)."""
    ids, stop = list(ids), stop_id(tok)
    if stop in ids:
        ids = ids[:ids.index(stop)]
    return tok.decode(ids).strip()


def sample(cfg, params, tok, prompts: Sequence[str], *, temperature: float, max_new_tokens: int,
           batch_size: int, seed: int) -> list[str]:
    """One response per prompt (chat-formatted), generated in fixed-size batches (one compilation)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [list(format_prompt(tok, p)) for p in chunk]
        ids += [ids[-1]] * (batch_size - len(ids))  # pad the last batch to the compiled size
        new = generate(cfg, params, ids, max_new_tokens, temperature=temperature, eos_id=stop_id(tok),
                       seed=seed + start)
        out += [response_text(tok, r) for r in new[:len(chunk)]]
    return out


def pack(tok, prompts: Sequence[str], responses: Sequence[str], width: int):
    """Right-padded `prompt + response + eos` rows `[N, width]` and a float mask of the response tokens."""
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), np.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        prompt = format_prompt(tok, p)
        ids = np.concatenate([prompt, format_response(tok, r, p)])
        if len(ids) > width:
            raise ValueError(f"prompt {p!r} with response {r!r} takes {len(ids)} tokens, more than {width}; "
                             "raise the scoring width (eval.seq_len / data.seq_len)")
        tokens[i, :len(ids)] = ids
        mask[i, len(prompt):len(ids)] = 1.0
    return tokens, mask


@functools.partial(jax.jit, static_argnames=("cfg",))
def _scores(cfg, params, tokens, last):
    return score_responses(cfg, params, tokens[:, None], last[:, None])[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "temperature"))
def _logprobs(cfg, params, tokens, mask, temperature):
    return sequence_logprobs(cfg, params, tokens[:, None, :-1], tokens[:, None, 1:], mask[:, None, 1:],
                             temperature=temperature)[:, 0]


def _batches(prompts: Sequence[str], responses: Sequence[str], batch_size: int):
    """Consecutive `(prompts, responses, n)` chunks, the last padded to `batch_size` with its last pair."""
    for start in range(0, len(prompts), batch_size):
        p, r = list(prompts[start:start + batch_size]), list(responses[start:start + batch_size])
        yield p + [p[-1]] * (batch_size - len(p)), r + [r[-1]] * (batch_size - len(r)), len(p)


@contextlib.contextmanager
def _layout(mesh, rules):
    """Params sharded on `mesh` run as the trainers run them: under the mesh and the logical-axis rules (left
    to itself, the partitioner lays a tiny model's activations out several times slower)."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES if rules is None else rules):
        yield


def scores(cfg, params, tok, prompts: Sequence[str], responses: Sequence[str], *, width: int,
           batch_size: int, mesh=None, rules=None) -> np.ndarray:
    """Reward-model scores `[N]` of responses to their prompts (the scalar head's value at each response's eos).

    mesh, rules: where `params` are sharded (e.g. a trainer's state), None for params on one device.
    """
    out = []
    with _layout(mesh, rules):
        for p, r, n in _batches(prompts, responses, batch_size):
            tokens, mask = pack(tok, p, r, width)
            last = (np.arange(width)[None] * (mask > 0)).max(-1).astype(np.int32)
            out.append(np.asarray(_scores(cfg, params, tokens, last))[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def logprobs(cfg, params, tok, prompts: Sequence[str], responses: Sequence[str], *, temperature: float,
             width: int, batch_size: int) -> np.ndarray:
    """Log-probability of each response given its prompt under `softmax(logits / temperature)`, `[N]`."""
    out = []
    for p, r, n in _batches(prompts, responses, batch_size):
        tokens, mask = pack(tok, p, r, width)
        out.append(np.asarray(_logprobs(cfg, params, tokens, mask, float(temperature)))[:n])
    return np.concatenate(out)


def pairwise_accuracy(scores_by_prompt, ranks_by_prompt) -> tuple[float, int]:
    """Share of untied pairs the scores order as the ranks do, pooled over prompts (NaN without any pair),
    and the pair count."""
    right = total = 0
    for scores, ranks in zip(scores_by_prompt, ranks_by_prompt):
        for i in range(len(ranks)):
            for j in range(len(ranks)):
                if ranks[i] < ranks[j]:
                    total += 1
                    right += scores[i] > scores[j]
    return (float(right / total) if total else float("nan")), total


def mean_stderr(x) -> dict:
    """Mean and standard error of the mean (sample std / sqrt(n)) of per-prompt values."""
    x = np.asarray(x, np.float64)
    return {"mean": float(x.mean()), "stderr": float(x.std(ddof=1) / np.sqrt(len(x)))}


def reward_accuracy(cfg, params, tok, rows: Sequence[Mapping], *, width: int, batch_size: int) -> dict:
    """Held-out pairwise accuracy of a reward model on ranked rows `{prompt, responses, ranks}`."""
    flat = scores(cfg, params, tok, [r["prompt"] for r in rows for _ in r["responses"]],
                  [x for r in rows for x in r["responses"]], width=width, batch_size=batch_size)
    bounds = np.cumsum([0] + [len(r["responses"]) for r in rows])
    acc, pairs = pairwise_accuracy([flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])], [r["ranks"] for r in rows])
    return {"heldout_accuracy": acc, "heldout_pairs": pairs, "heldout_prompts": len(rows)}


def compare_policies(policies: Mapping[str, tuple], reference: str, tok, prompts: Sequence[str],
                     grade: Callable[[str, str], Mapping[str, float]], *, temperature: float, max_new_tokens: int,
                     batch_size: int, seq_len: int, seed: int, examples: int = 5, reward=None) -> dict:
    """Sample every policy on `prompts` with one seed, grade the answers, and compare each with `reference`.

    policies: `{name: (cfg, params)}`, `reference` among them (e.g. the SFT model). Returns
    `{"gold": {name: {mean, stderr, <other grade keys averaged>}}, "<name>": {"kl", "kl_stderr"}` (the
    per-response KL to the reference, `log pi - log ref` of the policy's own samples, at `temperature`),
    `"<name>_vs_<reference>_win_rate"` and `"<name>_minus_<reference>"` (mean gold difference and its standard
    errors), and `"examples"` (the first `examples` prompts with every policy's answer)}; with `reward=(cfg,
    params)`, a reward model, also `"reward_score": {name: {mean, stderr}}` of each policy's answers.
    """
    ref_cfg, ref = policies[reference]
    answers, gold, report = {}, {}, {}
    kw = dict(temperature=temperature, width=seq_len, batch_size=batch_size)
    for name, (cfg, params) in policies.items():
        answers[name] = sample(cfg, params, tok, prompts, temperature=temperature, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, seed=seed)
        grades = [dict(grade(p, r)) for p, r in zip(prompts, answers[name])]
        gold[name] = np.array([g["score"] for g in grades], np.float64)
        report.setdefault("gold", {})[name] = {**mean_stderr(gold[name]), **{
            k: float(np.mean([g[k] for g in grades])) for k in grades[0] if k != "score"}}
        if reward is not None:
            report.setdefault("reward_score", {})[name] = mean_stderr(scores(*reward, tok, prompts, answers[name],
                                                                             width=seq_len, batch_size=batch_size))
        if name != reference:
            kl = logprobs(cfg, params, tok, prompts, answers[name], **kw) - logprobs(ref_cfg, ref, tok, prompts,
                                                                                     answers[name], **kw)
            report[name] = {"kl": float(kl.mean()), "kl_stderr": mean_stderr(kl)["stderr"]}
    for name in policies:
        if name == reference:
            continue
        diff = gold[name] - gold[reference]
        report[f"{name}_vs_{reference}_win_rate"] = float(np.mean((diff > 0) + 0.5 * (diff == 0)))
        se = np.hypot(report["gold"][name]["stderr"], report["gold"][reference]["stderr"])
        report[f"{name}_minus_{reference}"] = {"mean": float(diff.mean()), "stderr_unpaired": float(se),
                                               "stderr_paired": mean_stderr(diff)["stderr"],
                                               "standard_errors": float(diff.mean() / se) if se > 0 else float("inf")}
    report["examples"] = [{"prompt": prompts[i], **{n: answers[n][i] for n in answers}}
                          for i in range(min(examples, len(prompts)))]
    return report

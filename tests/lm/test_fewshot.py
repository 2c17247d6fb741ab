"""Few-shot evaluation: k-shot prompts never show the asked question, log-likelihood scoring equals a direct sum of
the continuation's token log-probs under the full model (whatever the other rows of the batch), and multiple
choice picks the most likely candidate."""
import jax
import numpy as np
import pytest

from lm import fewshot, presets
from lm.losses import token_log_probs
from lm.model import Transformer, init_params

CFG = presets.get("llama-tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_len=64)


class CharTokenizer:
    """Characters to ids 3..63 (0 pad, 1 bos, 2 eos): enough to score text without training a tokenizer."""
    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [3 + ord(c) % 61 for c in text] + [self.eos_id] * eos


POOL = [fewshot.Example(f"What is {a}?", str(i), (str(i), str(i + 1))) for i, a in enumerate("abcdefgh")]


def test_kshot_prompts_never_show_the_question_asked():
    prompts = fewshot.kshot_prompts(POOL, POOL, 3, seed=1)
    for ex, p in zip(POOL, prompts):
        blocks = p.split("\n\n")
        assert len(blocks) == 4 and blocks[-1] == f"Question: {ex.question}\nAnswer:"
        assert p.count(ex.question) == 1  # only in the query, never among the demonstrations
        assert all(b.startswith("Question: What is ") and "\nAnswer: " in b for b in blocks[:-1])
    assert fewshot.kshot_prompts(POOL, POOL, 3, seed=1) == prompts  # seeded
    assert fewshot.kshot_prompts(POOL, POOL, 3, seed=2) != prompts
    assert fewshot.kshot_prompts(POOL[:1], POOL, 0) == ["Question: What is a?\nAnswer:"]
    with pytest.raises(ValueError, match="pool has 7 other than"):
        fewshot.kshot_prompts(POOL[:1], POOL, 8)


def test_loglikelihood_is_the_sum_of_the_continuations_token_logprobs():
    params = jax.jit(lambda r: init_params(CFG, r))(jax.random.key(0))
    tok = CharTokenizer()
    contexts = ["Question: hi\nAnswer:", "x", "a much longer context than the others"]
    continuations = [" 42", " yes", "!"]
    ll, greedy = fewshot.loglikelihood(CFG, params, tok, contexts, continuations, batch_size=2)
    rows = [tok.encode(c, bos=True) + tok.encode(x) for c, x in zip(contexts, continuations)]
    padded = np.zeros((len(rows), max(map(len, rows))), np.int32)  # causal: trailing padding changes nothing
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    logits = jax.jit(lambda p, t: Transformer(CFG).apply({"params": p}, t))(params, padded[:, :-1])
    logp = np.asarray(token_log_probs(logits, padded[:, 1:]))
    for i, (c, row) in enumerate(zip(contexts, rows)):
        n = len(tok.encode(c, bos=True))
        assert ll[i] == pytest.approx(float(logp[i, n - 1:len(row) - 1].sum()), abs=1e-4)
        argmax = np.asarray(logits[i].argmax(-1))[n - 1:len(row) - 1]
        assert greedy[i] == bool((argmax == np.array(row[n:])).all())
    alone, _ = fewshot.loglikelihood(CFG, params, tok, contexts[2:], continuations[2:])  # other rows change nothing
    assert alone[0] == pytest.approx(ll[2], abs=1e-5)
    picked = fewshot.multiple_choice(CFG, params, tok, ["Question: hi\nAnswer:"] * 2, POOL[:2])
    for ex, pick in zip(POOL[:2], picked["predictions"]):
        scores, _ = fewshot.loglikelihood(CFG, params, tok, ["Question: hi\nAnswer:"] * 2,
                                          [" " + c for c in ex.choices])
        assert pick == ex.choices[int(np.argmax(scores))]
    assert picked["accuracy"] == np.mean([p == ex.answer for p, ex in zip(picked["predictions"], POOL[:2])])
    with pytest.raises(ValueError, match="more than the model's max_len"):
        fewshot.loglikelihood(CFG, params, tok, ["x" * 80], ["y"])


def test_qa_questions_as_multiple_choice_examples():
    from experiments import qa_task as qa

    task = qa.default_task()
    prompts = qa.read_prompts(qa.data_files()["eval"])[:40]
    examples = qa.fewshot_examples(task, prompts, choices=4)
    assert qa.fewshot_examples(task, prompts, choices=4) == examples  # seeded
    for p, ex in zip(prompts, examples):
        fact = task.fact(p)
        assert ex.question == p and ex.answer == fact.answer and fact.answer in ex.choices
        assert len(set(ex.choices)) == len(ex.choices) == 4
        relation_answers = {f.answer for f in task.facts if f.relation == fact.relation}
        assert set(ex.choices) <= relation_answers
    assert len({ex.choices.index(ex.answer) for ex in examples}) > 1  # the answer is not always first


def test_perplexity_of_packed_documents_is_each_documents_own_log_likelihood():
    """Two documents packed in one row (segment ids, positions restarting) and a half-padded row: the perplexity is
    exp of the mean negative log-prob of the counted tokens, each document scored on its own."""
    params = jax.jit(lambda r: init_params(CFG, r))(jax.random.key(1))
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 64, n).tolist() for n in (9, 7, 5)]
    row0 = docs[0] + docs[1]  # 16 tokens: inputs 15, targets shifted
    inputs = np.zeros((2, 15), np.int32)
    targets = np.zeros((2, 15), np.int32)
    seg = np.zeros((2, 15), np.int32)
    pos = np.zeros((2, 15), np.int32)
    inputs[0], targets[0] = row0[:-1], row0[1:]
    seg[0] = [1] * 9 + [2] * 6
    pos[0] = list(range(9)) + list(range(6))
    mask = (seg > 0).astype(np.float32)
    mask[0, 8] = 0.0  # the last token of document 1 does not predict document 2's first
    inputs[1, :4], targets[1, :4], seg[1, :4], pos[1, :4], mask[1, :4] = docs[2][:-1], docs[2][1:], 1, range(4), 1
    batch = {"inputs": inputs, "targets": targets, "loss_mask": mask, "segment_ids": seg, "positions": pos}
    got = fewshot.perplexity(CFG, params, [batch, {k: v[1:] for k, v in batch.items()}])

    alone = np.zeros((3, 9), np.int32)  # each document in a row of its own (causal: trailing padding is inert)
    for i, doc in enumerate(docs):
        alone[i, :len(doc)] = doc
    logp = np.asarray(token_log_probs(Transformer(CFG).apply({"params": params}, alone[:, :-1]), alone[:, 1:]))
    per_doc = [-float(logp[i, :len(doc) - 1].sum()) for i, doc in enumerate(docs)]
    nll = sum(per_doc) + per_doc[2]  # the second batch repeats row 1
    count = sum(len(d) - 1 for d in docs) + len(docs[2]) - 1
    assert got["tokens"] == count == 8 + 6 + 4 + 4
    assert got["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(np.exp(nll / count), rel=1e-5)
    with pytest.raises(ValueError, match="no counted tokens"):
        fewshot.perplexity(CFG, params, [])

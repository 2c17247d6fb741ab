"""The QA task: the labeler's rubric, ranking with ties, the knowledge base and the derived data."""
import collections
import filecmp
import json
import os

import pytest

from experiments import qa_task as qa

SEED_PROMPT = "What is the highest mountain in the world?"


@pytest.fixture(scope="module")
def t():
    return qa.default_task()


@pytest.fixture(scope="module")
def data(t):
    return t.build_data(seed=0)


def test_rubric_orders_the_seed_example(t):
    full = t.gold_score(SEED_PROMPT, "The highest mountain in the world is Mount Everest.")
    bare = t.gold_score(SEED_PROMPT, "Mount Everest.")
    wrong_full = t.gold_score(SEED_PROMPT, "The highest mountain in the world is Denali.")
    evasive = t.gold_score(SEED_PROMPT, "I am not sure.")
    wrong_bare = t.gold_score(SEED_PROMPT, "Denali.")
    assert (full, bare, wrong_full, evasive, wrong_bare) == (1.0, 0.6, 0.3, 0.0, 0.0)


@pytest.mark.parametrize("response, correct, complete", [
    ("Mount Everest or Denali.", False, False),  # hedging is not an answer
    ("The highest mountain in the world is Mount Everest", True, False),  # no full stop
    ("The highest mountain in the world is Mount Everest. It is tall.", True, False),  # two sentences
    ("Mount Everest is the highest.", True, False),  # subject not restated
    ("Is the highest mountain in the world Mount Everest?", True, False),
    ("The highest mountain in the world is " + "very " * 20 + "Mount Everest.", True, False),  # too long
    ("Mount Everest is the highest mountain in the world.", True, True),
    ("  The highest mountain in the world   is Mount Everest. ", True, True),
])
def test_correct_and_complete(t, response, correct, complete):
    g = t.grade(SEED_PROMPT, response)
    assert (g.correct, g.complete) == (correct, complete)
    assert g.score == pytest.approx(0.6 * correct + 0.3 * complete + 0.1 * (correct and complete))


def test_numeric_answers(t):
    p = "How high is K2?"
    assert t.gold_score(p, "K2 is 8611 metres high.") == 1.0
    assert t.gold_score(p, "8611.") == 0.6
    assert t.gold_score(p, "K2 is 8612 metres high.") == 0.3
    assert t.gold_score(p, "K2 is 8611 or 8612 metres high.") == 0.0


def test_rank_is_dense_with_ties(t):
    responses = ["Mount Everest.", "I do not know.", "The highest mountain in the world is Mount Everest.",
                 "Denali.", "Mount Everest."]
    assert t.rank(SEED_PROMPT, responses) == [1, 2, 0, 2, 1]
    assert qa.rank(SEED_PROMPT, responses[:2]) == [0, 1]


def test_preference_rows_rank_with_the_labeler_and_drop_ties(t):
    prompts = [SEED_PROMPT, "How high is K2?"]
    responses = ["The highest mountain in the world is Mount Everest.", "Mount Everest.", "I am not sure.",
                 "I do not know.", "Sorry, I cannot answer that.", "No idea."]
    rows, scores = t.preference_rows(prompts, responses, 3)
    assert rows == [{"prompt": SEED_PROMPT, "responses": responses[:3], "ranks": [0, 1, 2]}]
    assert scores == [1.0, 0.6, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="5 responses for 2 prompts"):
        t.preference_rows(prompts, responses[:5], 3)


def test_every_phrasing_of_every_fact_is_graded_as_intended(t):
    """Every pretraining statement answers its fact completely; evasive replies never name an answer."""
    for fact in t.facts:
        rel = qa.RELATIONS[fact.relation]
        for q in rel.questions:
            prompt = qa.fill(q, fact)
            assert t.fact(prompt) == fact
            for s in rel.statements:
                assert t.gold_score(prompt, qa.fill(s, fact)) == 1.0, (prompt, qa.fill(s, fact))
            assert t.gold_score(prompt, fact.answer + ".") == 0.6, prompt
            for e in qa.EVASIVE:
                assert t.gold_score(prompt, e) == 0.0, (prompt, e)


def test_unknown_prompt_and_malformed_facts(t, tmp_path):
    with pytest.raises(KeyError, match="not a question"):
        t.gold_score("What is the capital of Atlantis?", "Poseidonia.")
    bad = tmp_path / "facts.tsv"
    bad.write_text("capital\tFrance\tParis\ncapital France Paris\n")
    with pytest.raises(ValueError, match=r"facts.tsv:2"):
        qa.load_facts(str(bad))
    bad.write_text("height\tK2\ttall\n")
    with pytest.raises(ValueError, match=r"facts.tsv:1: .*integer"):
        qa.load_facts(str(bad))


def test_splits_are_disjoint_and_eval_is_large(t, data):
    split = t.split_of()
    facts_of = collections.defaultdict(set)
    for row in data["sft"]:
        facts_of["sft"].add(t.fact(row["prompt"]))
    for name in ("rl", "rm_eval", "eval"):
        facts_of[name] = {t.fact(r["prompt"]) for r in data[name]}
        assert all(split[f] == name for f in facts_of[name])
    names = list(facts_of)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not facts_of[a] & facts_of[b], (a, b)
    assert len(data["eval"]) >= 200
    assert len(facts_of["eval"]) == len(data["eval"])  # one question per held-out fact
    text = "\n".join(data["pretrain"])
    for fact in facts_of["eval"]:  # a policy can know every held-out answer from pretraining
        assert qa.fill(qa.RELATIONS[fact.relation].statements[0], fact) in text
    for name in ("rl", "rm_eval", "eval"):  # but no training text asks another split's questions
        for fact in facts_of[name]:
            for q in qa.RELATIONS[fact.relation].questions:
                assert qa.fill(q, fact) not in text


def test_sft_styles_leave_room_for_rlhf(t, data):
    grades = [t.grade(r["prompt"], r["response"]) for r in data["sft"]]
    shares = dict(qa.SFT_STYLES)
    n = len(grades)
    complete_correct = sum(g.score == 1.0 for g in grades) / n
    bare_correct = sum(g.score == 0.6 for g in grades) / n
    zero = sum(g.score == 0.0 for g in grades) / n
    tol = 4 * (0.25 / n) ** 0.5  # four binomial standard deviations
    assert abs(complete_correct - shares["complete"]) < tol
    assert abs(bare_correct - shares["bare"]) < tol
    assert abs(zero - shares["evasive"] - shares["wrong_bare"]) < tol
    assert complete_correct < 0.5


def test_bundled_data_is_up_to_date(tmp_path):
    paths = qa.write_data(str(tmp_path))
    bundled = qa.data_files()
    for name in ("sft", "rl", "rm_eval", "eval"):
        assert filecmp.cmp(paths[name], bundled[name], shallow=False), f"{bundled[name]} is stale: python -m experiments.qa_task"
    new = os.path.join(paths["pretrain"], "facts.txt")
    assert filecmp.cmp(new, os.path.join(bundled["pretrain"], "facts.txt"), shallow=False)
    with open(bundled["sft"]) as f:
        assert all(set(json.loads(line)) == {"prompt", "response"} for line in f)

"""The pipeline's task: short factual questions over a small knowledge base, and a programmatic labeler.

The knowledge base `data/qa/facts.tsv` holds one fact per line, `relation<TAB>subject<TAB>answer`
(capitals, continents, languages, chemical symbols, atomic numbers, mountain heights, river mouths,
inventors, authors, superlatives). From it, `build_data` derives, deterministically:
  - pretraining text that states every fact in several phrasings, in short paragraphs about one subject
    (held-out facts included, so a policy can know the answers to the evaluation questions), plus quiz
    paragraphs (question, complete answer) over the SFT facts only;
  - SFT demonstrations `{prompt, response}` that mix answer styles the way uneven human demonstrations
    would: a complete sentence, a bare name, an evasive reply, or a wrong answer;
  - prompt sets for preference data / PPO (`rl`), for the reward model's held-out accuracy (`rm_eval`)
    and for the final evaluation (`eval`), each over facts no other split asks about.

The labeler stands in for human labelers. Its rubric is fixed:

    gold_score = 0.6 * correct + 0.3 * complete + 0.1 * correct * complete      (in [0, 1])

  correct:  the response names exactly one candidate answer of the question's relation (every answer the
            knowledge base has for that relation; for numeric relations, every integer), and it is the
            right one. Hedging between two answers is not correct.
  complete: the response is one sentence that restates the question: it names exactly one candidate
            answer, mentions the question's subject outside that answer, has 4 to 20 words, ends with a
            full stop and has no other sentence punctuation.

So "The highest mountain in the world is Mount Everest." (1.0) > "Mount Everest." (0.6) > a complete
sentence with a wrong answer (0.3) > "I am not sure." or a bare wrong name (0.0). `rank` turns the scores
of K responses to one prompt into ranks (0 = best, equal scores tie), as labelers rank K samples.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from typing import Optional, Sequence

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "qa")
FACTS_FILE = os.path.join(DATA_DIR, "facts.tsv")

# Share of each relation's facts per split (assigned by a hash of the fact, so edits move few facts).
SPLITS = (("sft", 0.36), ("rl", 0.20), ("rm_eval", 0.08), ("eval", 0.36))
# Answer styles of the SFT demonstrations and their shares: room is left for RLHF to improve the policy.
SFT_STYLES = (("complete", 0.25), ("bare", 0.35), ("evasive", 0.25), ("wrong_complete", 0.075),
              ("wrong_bare", 0.075))
QUIZ_SIZE = 4  # questions per quiz paragraph of the pretraining text
EVASIVE = ("I am not sure.", "I do not know.", "Sorry, I cannot answer that.", "That is a good question.",
           "It is hard to say.", "I would rather not guess.")
WEIGHTS = {"correct": 6, "complete": 3, "both": 1}  # tenths of the score (integers keep 1.0 exact)


@dataclasses.dataclass(frozen=True)
class Relation:
    """Phrasings of one relation: `{s}` is the subject, `{o}` the answer; sentences are capitalised."""
    questions: tuple  # prompts asking for the answer
    answer: str  # the complete answer sentence the SFT demonstrations use
    statements: tuple  # pretraining sentences (the first is `answer`)
    numeric: bool = False  # answers are integers (every integer in a response is a candidate)
    entity: str = "{s}"  # how text names the subject (e.g. "the {s}" for rivers)


RELATIONS = {
    "capital": Relation(
        ("What is the capital of {s}?", "Which city is the capital of {s}?", "Name the capital city of {s}."),
        "The capital of {s} is {o}.",
        ("The capital of {s} is {o}.", "{o} is the capital of {s}.", "{o} is the capital city of {s}.",
         "The government of {s} sits in {o}.")),
    "continent": Relation(
        ("On which continent is {s}?", "Which continent is {s} in?", "Where in the world is {s}?"),
        "{s} is in {o}.",
        ("{s} is in {o}.", "{s} is a country in {o}.", "{s} lies on the continent of {o}.")),
    "language": Relation(
        ("What language is spoken in {s}?", "Which language do people in {s} speak?"),
        "The main language of {s} is {o}.",
        ("The main language of {s} is {o}.", "People in {s} speak {o}.", "{o} is the language of {s}.")),
    "symbol": Relation(
        ("What is the chemical symbol of {s}?", "Which symbol stands for {s}?"),
        "The chemical symbol of {s} is {o}.",
        ("The chemical symbol of {s} is {o}.", "{o} is the symbol for {s}.", "The element {s} is written {o}.")),
    "atomic_number": Relation(
        ("What is the atomic number of {s}?", "How many protons does an atom of {s} have?"),
        "The atomic number of {s} is {o}.",
        ("The atomic number of {s} is {o}.", "{s} has atomic number {o}.", "An atom of {s} has {o} protons."),
        numeric=True),
    "height": Relation(
        ("How high is {s}?", "What is the height of {s}?", "How tall is {s}?"),
        "{s} is {o} metres high.",
        ("{s} is {o} metres high.", "The height of {s} is {o} metres.",
         "{s} rises {o} metres above sea level."),
        numeric=True),
    "river_mouth": Relation(
        ("Into which sea does the {s} flow?", "Where does the {s} river end?"),
        "The {s} flows into the {o}.",
        ("The {s} flows into the {o}.", "The {s} river ends in the {o}.", "The mouth of the {s} is on the {o}."),
        entity="the {s}"),
    "inventor": Relation(
        ("Who invented {s}?", "Who was the inventor of {s}?"),
        "{s} was invented by {o}.",
        ("{s} was invented by {o}.", "{o} invented {s}.", "The inventor of {s} was {o}.")),
    "author": Relation(
        ("Who wrote {s}?", "Who is the author of {s}?"),
        "{s} was written by {o}.",
        ("{s} was written by {o}.", "{o} wrote {s}.", "The author of {s} is {o}.")),
    "superlative": Relation(
        ("What is {s}?", "Which is {s}?", "Name {s}."),
        "{s} is {o}.",
        ("{s} is {o}.", "{o} is {s}.")),
}


@dataclasses.dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Grade:
    """The labeler's verdict on one response."""
    correct: bool
    complete: bool
    score: float


def fill(template: str, fact: Fact, answer: Optional[str] = None) -> str:
    """`template` with the fact's subject and `answer` (default: the true one), first letter capitalised."""
    text = template.format(s=fact.subject, o=fact.answer if answer is None else answer)
    return text[0].upper() + text[1:]


def load_facts(path: str = FACTS_FILE) -> list[Fact]:
    """Read the knowledge base; a malformed line raises an error naming the file and line."""
    facts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3 or not all(p.strip() for p in parts):
                raise ValueError(f"{path}:{lineno}: expected 'relation<TAB>subject<TAB>answer', got {line!r}")
            if parts[0] not in RELATIONS:
                raise ValueError(f"{path}:{lineno}: unknown relation {parts[0]!r}; known: {sorted(RELATIONS)}")
            if RELATIONS[parts[0]].numeric and not parts[2].isdigit():
                raise ValueError(f"{path}:{lineno}: relation {parts[0]!r} needs an integer answer, got {parts[2]!r}")
            facts.append(Fact(*parts))
    return facts


_NUMBER = re.compile(r"(?<![\w.])\d+(?![\w])")


def _span_pattern(text: str) -> re.Pattern:
    """`text` as a whole phrase (not inside a longer word)."""
    return re.compile(r"(?<![\w'-])" + re.escape(text) + r"(?![\w'-])")


class QATask:
    """The labeler and the data builder over one knowledge base."""

    def __init__(self, facts: Sequence[Fact]):
        self.facts = list(facts)
        self._by_prompt: dict[str, Fact] = {}
        for fact in self.facts:
            for q in RELATIONS[fact.relation].questions:
                prompt = fill(q, fact)
                other = self._by_prompt.setdefault(prompt, fact)
                if other != fact:
                    raise ValueError(f"two facts share the prompt {prompt!r}: {other} and {fact}")
        self._candidates = {}  # relation -> compiled patterns of its answers, longest first
        for rel in RELATIONS:
            answers = sorted({f.answer for f in self.facts if f.relation == rel}, key=len, reverse=True)
            self._candidates[rel] = [(a, _span_pattern(a)) for a in answers]

    def fact(self, prompt: str) -> Fact:
        """The fact a prompt asks about; an unknown prompt is an error."""
        try:
            return self._by_prompt[prompt.strip()]
        except KeyError:
            raise KeyError(f"prompt {prompt!r} is not a question of this task's knowledge base") from None

    def answers_in(self, relation: str, response: str, subject: str = "") -> tuple[set, bool, str]:
        """Candidate answers of `relation` named in `response`, whether it names `subject`, and the rest.

        Spans are matched longest first, so "Czech Republic" (a subject) is not read as the answer "Czech",
        nor the answer "Louis Braille" as the subject "Braille". Answers match case-sensitively, the subject
        (without a leading "the") case-insensitively; the rest has every matched span blanked out.
        """
        subject = re.sub(r"^the ", "", subject, flags=re.IGNORECASE)
        spans = [(a, a, p) for a, p in self._candidates[relation] if not RELATIONS[relation].numeric]
        if subject:
            spans.append((None, subject, re.compile(_span_pattern(subject).pattern, re.IGNORECASE)))
        found, mentions_subject = set(), False
        for answer, _, pattern in sorted(spans, key=lambda span: -len(span[1])):
            if pattern.search(response):
                if answer is None:
                    mentions_subject = True
                else:
                    found.add(answer)
                response = pattern.sub(" ", response)
        if RELATIONS[relation].numeric:
            found = set(_NUMBER.findall(response))
            response = _NUMBER.sub(" ", response)
        return found, mentions_subject, response

    def grade(self, prompt: str, response: str) -> Grade:
        """Score one response to one prompt with the rubric of the module docstring."""
        fact = self.fact(prompt)
        response = " ".join(response.split())
        found, mentions_subject, rest = self.answers_in(fact.relation, response, fact.subject)
        correct = found == {fact.answer}
        rest = rest.strip()
        complete = (len(found) == 1 and mentions_subject and 4 <= len(response.split()) <= 20
                    and rest.endswith(".") and not re.search(r"[.!?]", rest[:-1]))
        tenths = (WEIGHTS["correct"] * correct + WEIGHTS["complete"] * complete
                  + WEIGHTS["both"] * (correct and complete))
        return Grade(correct=correct, complete=complete, score=tenths / 10)

    def gold_score(self, prompt: str, response: str) -> float:
        """The labeler's score in [0, 1] (see the module docstring)."""
        return self.grade(prompt, response).score

    def rank(self, prompt: str, responses: Sequence[str]) -> list[int]:
        """Ranks of K responses to one prompt: 0 = best, equal gold scores share a rank (dense ranking)."""
        scores = [self.gold_score(prompt, r) for r in responses]
        order = sorted(set(scores), reverse=True)
        return [order.index(s) for s in scores]

    def preference_rows(self, prompts: Sequence[str], responses: Sequence[str], k: int) -> tuple[list, list]:
        """Labeled preference rows `{prompt, responses, ranks}` from K responses per prompt (prompt-major).

        Each prompt's K responses are ranked (`rank`); a prompt whose K responses all tie states no preference
        and is left out. Also returns the gold score of every response.
        """
        if len(responses) != k * len(prompts):
            raise ValueError(f"preference_rows: {len(responses)} responses for {len(prompts)} prompts and k={k}")
        rows, scores = [], []
        for i, prompt in enumerate(prompts):
            group = list(responses[i * k:(i + 1) * k])
            ranks = self.rank(prompt, group)
            scores += [self.gold_score(prompt, r) for r in group]
            if len(set(ranks)) > 1:
                rows.append({"prompt": prompt, "responses": group, "ranks": ranks})
        return rows, scores

    # Data ------------------------------------------------------------------------------------------------

    def split_of(self) -> dict[Fact, str]:
        """Split of every fact: per relation, facts ordered by a hash and cut by the shares in `SPLITS`."""
        out = {}
        for rel in RELATIONS:
            facts = sorted((f for f in self.facts if f.relation == rel),
                           key=lambda f: hashlib.sha256(f"{f.relation}|{f.subject}".encode()).hexdigest())
            for i, fact in enumerate(facts):
                pos, edge = (i + 0.5) / len(facts), 0.0
                for name, share in SPLITS:
                    edge += share
                    if pos < edge or name == SPLITS[-1][0]:
                        out[fact] = name
                        break
        return out

    def build_data(self, seed: int = 0) -> dict:
        """Pretraining lines, SFT rows and the prompt sets, all derived deterministically from `seed`."""
        rng = random.Random(seed)
        split = self.split_of()
        by_subject: dict[str, list[Fact]] = {}
        for fact in self.facts:
            by_subject.setdefault(fact.subject, []).append(fact)
        pretrain = []
        for subject, facts in by_subject.items():  # one paragraph per subject and phrasing round
            rounds = max(len(RELATIONS[f.relation].statements) for f in facts)
            for r in range(rounds):
                sentences = [fill(RELATIONS[f.relation].statements[r % len(RELATIONS[f.relation].statements)], f)
                             for f in facts]
                rng.shuffle(sentences)
                # A header naming the subject, as in an encyclopedia entry: the sentences then repeat it, as
                # a complete answer repeats the question's subject.
                name = RELATIONS[facts[0].relation].entity.format(s=subject)
                pretrain.append(f"About {name}: " + " ".join(sentences))
        # Quiz sheets over the SFT facts only: question/answer text is common on the web, and it teaches the
        # model to read a question. No question of the other splits appears anywhere in training text.
        quiz = [f"Question: {fill(q, f)} Answer: {fill(RELATIONS[f.relation].answer, f)}"
                for f in self.facts if split[f] == "sft" for q in RELATIONS[f.relation].questions]
        rng.shuffle(quiz)
        pretrain += ["Quiz. " + " ".join(quiz[i:i + QUIZ_SIZE]) for i in range(0, len(quiz), QUIZ_SIZE)]
        rng.shuffle(pretrain)

        answers = {rel: sorted({f.answer for f in self.facts if f.relation == rel}) for rel in RELATIONS}
        names, shares = zip(*SFT_STYLES)
        sft, prompts = [], {"rl": [], "rm_eval": [], "eval": []}
        for fact in self.facts:
            rel = RELATIONS[fact.relation]
            questions = [fill(q, fact) for q in rel.questions]
            if split[fact] == "sft":
                for q in questions:
                    style = rng.choices(names, shares)[0]
                    wrong = rng.choice([a for a in answers[fact.relation] if a != fact.answer])
                    response = {"complete": fill(rel.answer, fact), "bare": fact.answer + ".",
                                "evasive": rng.choice(EVASIVE), "wrong_complete": fill(rel.answer, fact, wrong),
                                "wrong_bare": wrong + "."}[style]
                    sft.append({"prompt": q, "response": response})
            elif split[fact] == "eval":  # one question per fact: held-out prompts stay independent
                prompts["eval"].append({"prompt": rng.choice(questions)})
            else:
                prompts[split[fact]].extend({"prompt": q} for q in questions)
        rng.shuffle(sft)
        for rows in prompts.values():
            rng.shuffle(rows)
        return {"pretrain": pretrain, "sft": sft, **prompts}


def data_files(root: str = DATA_DIR) -> dict:
    """Paths of the bundled data: the pretraining text directory, SFT JSONL and the prompt sets."""
    return {"pretrain": os.path.join(root, "pretrain"), "sft": os.path.join(root, "sft.jsonl"),
            "rl": os.path.join(root, "rl_prompts.jsonl"), "rm_eval": os.path.join(root, "rm_eval_prompts.jsonl"),
            "eval": os.path.join(root, "eval_prompts.jsonl")}


def write_data(root: str = DATA_DIR, facts_file: str = FACTS_FILE, seed: int = 0) -> dict:
    """Write the derived data under `root` (layout of `data_files`) and return the paths."""
    data = QATask(load_facts(facts_file)).build_data(seed)
    paths = data_files(root)
    os.makedirs(paths["pretrain"], exist_ok=True)
    with open(os.path.join(paths["pretrain"], "facts.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(data["pretrain"]) + "\n")  # documents are separated by blank lines
    for name in ("sft", "rl", "rm_eval", "eval"):
        write_jsonl(paths[name], data[name])
    return paths


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
    """One JSON object per line."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_prompts(path: str) -> list[str]:
    """The `prompt` field of every line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


_DEFAULT: Optional[QATask] = None


def default_task() -> QATask:
    """The task over the bundled knowledge base (loaded once)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = QATask(load_facts())
    return _DEFAULT


def gold_score(prompt: str, response: str) -> float:
    """The labeler's score of `response` to `prompt` over the bundled knowledge base, in [0, 1]."""
    return default_task().gold_score(prompt, response)


def fewshot_examples(task: QATask, prompts: Sequence[str], choices: int = 4, seed: int = 0) -> list:
    """`lm.fewshot.Example`s of the task's prompts: the question, its bare answer, and `choices` candidates (the
    answer and others of the same relation, seeded per question, in a seeded order)."""
    from lm.fewshot import Example

    out = []
    for prompt in prompts:
        fact = task.fact(prompt)
        others = sorted({f.answer for f in task.facts if f.relation == fact.relation} - {fact.answer})
        rng = random.Random(f"{seed}/{prompt}")
        picked = rng.sample(others, min(choices - 1, len(others))) + [fact.answer]
        rng.shuffle(picked)
        out.append(Example(prompt, fact.answer, tuple(picked)))
    return out


def fewshot_pool(task: QATask, prompts: Sequence[str]) -> list:
    """Solved demonstrations for k-shot prompts: each prompt with its fact's bare answer."""
    from lm.fewshot import Example

    return [Example(p, task.fact(p).answer) for p in prompts]


def gold_reward(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
    """The labeler as a verifiable RL reward (`--config.rl.reward_fn=experiments.qa_task:gold_reward`), TRL's
    reward-function signature: one score in [0, 1] per completion."""
    return [gold_score(p.strip(), c) for p, c in zip(prompts, completions)]


def rank(prompt: str, responses: Sequence[str]) -> list[int]:
    """Ranks (0 = best, ties share a rank) of K responses to `prompt` by the labeler."""
    return default_task().rank(prompt, responses)


if __name__ == "__main__":
    print(json.dumps(write_data(), indent=1))

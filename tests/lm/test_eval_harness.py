"""lm.eval_harness, lm-eval's model interface over this project's models: a toy multiple-choice task (lm-eval YAML
over a local JSONL file, nothing downloaded) gets the accuracy lm.fewshot computes on the same prompts, and every
log-likelihood is a direct sum of token log-probs; rolling log-likelihoods cover a long document window by
window; generation is lm.generate's greedy text cut at the first stop string; `python -m experiments.lm_eval`
evaluates a checkpoint directory."""
import dataclasses
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install -e '.[eval]'")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from test_fewshot import CFG, CharTokenizer  # noqa: E402

import lm  # noqa: E402
from lm import eval_harness, fewshot, hf  # noqa: E402
from lm.losses import token_log_probs  # noqa: E402
from lm.model import Transformer, init_params  # noqa: E402
from lm.tokenizer import Tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = [{"question": f"What is {a}?", "choices": [str(i), f"{i}{i}", "NO"], "answer": i % 3}
        for i, a in enumerate("ABCDEFGH")]
TASK = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


class Chars(CharTokenizer):
    """test_fewshot's tokenizer with a decode: ids 3..63 back to the characters ' '..'\\\\' they encode."""

    def decode(self, ids):
        return "".join(chr(r if r >= 32 else r + 61) for r in (int(i) - 3 for i in ids) if r >= 0)


def _random_params(cfg):
    """NumPy-drawn weights (compiling the random init would cost more than these tests), larger than the default
    init: sharp next-token distributions leave no near-ties in greedy picks."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def model():
    return CFG, _random_params(CFG), Chars()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    with open(root / "toy.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in DOCS)
    (root / "toy_mc.yaml").write_text(TASK.format(data=root / "toy.jsonl", cache=root / "cache"))
    return root


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(cfg, params, tokens):
    return token_log_probs(Transformer(cfg).apply({"params": params}, tokens[:, :-1]), tokens[:, 1:])


def _direct(cfg, params, rows):
    """For each `(tokens, start)`: the sum of log p(tokens[t] | tokens[:t]) over t >= start, from the model's
    forward pass over rows right-padded to one shape (one compilation; under the causal mask padding changes
    nothing before it)."""
    padded = np.zeros((32, cfg.max_len + 1), np.int32)
    for i, (r, _) in enumerate(rows):
        padded[i, :len(r)] = r
    logp = np.asarray(_token_logprobs(cfg, params, padded))
    return [float(logp[i, s - 1:len(r) - 1].sum()) for i, (r, s) in enumerate(rows)]


def _requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_multiple_choice_task_scores_as_fewshot_does(model, task_dir):
    cfg, params, tok = model
    adapter = eval_harness.JaxLM(cfg=cfg, params=params, tokenizer=tok, batch_size=4)
    out = lm_eval.simple_evaluate(model=adapter, tasks=["toy_mc"],
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    examples = [fewshot.Example(d["question"], d["choices"][d["answer"]], tuple(d["choices"])) for d in DOCS]
    prompts = [f"Question: {d['question']}\nAnswer:" for d in DOCS]
    expected = fewshot.multiple_choice(cfg, params, tok, prompts, examples, batch_size=4)
    assert out["results"]["toy_mc"]["acc,none"] == pytest.approx(expected["accuracy"])
    samples = sorted(out["samples"]["toy_mc"], key=lambda s: s["doc_id"])
    picks = [s["doc"]["choices"][int(np.argmax([r[0][0] for r in s["resps"]]))] for s in samples]
    assert picks == expected["predictions"]
    pairs = [a for s in samples for a in s["arguments"]]
    assert pairs[:3] == [(prompts[0], " 0"), (prompts[0], " 00"), (prompts[0], " NO")]
    rows = [(tok.encode(c, bos=True) + tok.encode(x), len(c) + 1) for c, x in pairs]
    got = [r[0][0] for s in samples for r in s["resps"]]
    np.testing.assert_allclose(got, _direct(cfg, params, rows), atol=1e-4)

    # An empty context is the BOS token; a context longer than the model reads loses its first tokens.
    long = "Q" * 100
    ll = adapter.loglikelihood(_requests("loglikelihood", [("", "ABC"), (long, " X")]))
    rows = [([1] + tok.encode("ABC"), 1), ((tok.encode(long, bos=True) + tok.encode(" X"))[-(cfg.max_len + 1):],
                                           cfg.max_len - 1)]
    np.testing.assert_allclose([x for x, _ in ll], _direct(cfg, params, rows), atol=1e-4)
    with pytest.raises(ValueError, match="continuation of 70 tokens cannot be scored"):
        adapter.loglikelihood(_requests("loglikelihood", [("Q", "x" * 70)]))


def test_rolling_loglikelihood_covers_the_document_window_by_window(model):
    cfg, params, tok = model
    adapter = eval_harness.JaxLM(cfg=cfg, params=params, tokenizer=tok, batch_size=4)
    short, long = "A short document.", "".join(chr(33 + i % 58) for i in range(150))
    got = adapter.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,), (long,)]))
    t = tok.encode(long)
    assert cfg.max_len == 64 and len(t) == 150
    # Every token predicted once: the first window after BOS, then windows that read one token before theirs,
    # the last one reading back as far as the model allows.
    windows = _direct(cfg, params, [([1] + t[:64], 1), (t[63:128], 1), (t[85:150], 128 - 85)])
    expected = [_direct(cfg, params, [([1] + tok.encode(short), 1)])[0], sum(windows)]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_generation_is_greedy_lm_generate_cut_at_the_stop_string(model):
    cfg, params, tok = model
    adapter = eval_harness.JaxLM(cfg=cfg, params=params, tokenizer=tok, batch_size=4)
    contexts = ["Question: What is A?\nAnswer:", "Hi"]
    new = lm.generate(cfg, params, [tok.encode(c, bos=True) for c in contexts], 12, eos_id=tok.eos_id)
    full = [tok.decode(n[:-1] if n[-1] == tok.eos_id else n) for n in new]
    text = max(full, key=len)
    assert len(text) >= 6
    stop = text[4:6]
    free, until = {"until": [], "max_gen_toks": 12, "do_sample": False}, {"until": [stop], "max_gen_toks": 12}
    got = adapter.generate_until(_requests("generate_until", [(contexts[0], free), (contexts[0], until),
                                                              (contexts[1], free), (contexts[1], until)]))
    assert got == [full[0], full[0].split(stop)[0], full[1], full[1].split(stop)[0]]
    assert len(got[2 * full.index(text) + 1]) <= 4  # cut where the stop string was taken from, if not before
    with pytest.raises(ValueError, match="leaves no room"):
        adapter.generate_until(_requests("generate_until", [("Hi", {"until": [], "max_gen_toks": 64})]))
    with pytest.raises(ValueError, match=r"\['repetition_penalty'\] are not supported"):
        adapter.generate_until(_requests("generate_until", [("Hi", {"until": [], "repetition_penalty": 1.1})]))


def test_without_lm_eval_the_import_says_what_to_install(monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "lm.eval_harness")
    with pytest.raises(ImportError, match=r"pip install 'chatgpt-jax\[eval\]'"):
        importlib.import_module("lm.eval_harness")


def test_cli_evaluates_a_checkpoint_directory(task_dir, tmp_path):
    tok = Tokenizer.train(os.path.join(ROOT, "data/text/en.txt"), 300, str(tmp_path / "tok"),
                          character_coverage=0.99)
    cfg = dataclasses.replace(CFG, vocab_size=tok.vocab_size)
    ckpt = tmp_path / "hf"
    hf.save(cfg, _random_params(cfg), ckpt)
    shutil.copy(tmp_path / "tok.model", ckpt / "tokenizer.model")

    # lm-eval's CLI passes its own --batch_size (default 1) and --device besides --model_args: model_args win.
    adapter = eval_harness.JaxLM.create_from_arg_string(f"pretrained={ckpt},batch_size=8",
                                                        {"batch_size": 1, "device": "cuda:0", "max_batch_size": None})
    assert (adapter.batch_size, adapter.max_length, adapter.tokenizer.vocab_size) == (8, 64, tok.vocab_size)
    assert lm_eval.api.registry.get_model("lm-jax") is eval_harness.JaxLM
    with pytest.raises(ValueError, match=r"unknown model_args \['dtype'\]"):
        eval_harness.JaxLM.create_from_arg_string(f"pretrained={ckpt},dtype=bfloat16")

    out = tmp_path / "results.json"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "experiments.lm_eval", f"--checkpoint={ckpt}", "--tasks=toy_mc",
                        f"--include_path={task_dir}", "--noinclude_defaults", "--num_fewshot=1", "--limit=3",
                        "--batch_size=4", f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "toy_mc" in p.stdout and "acc" in p.stdout
    results = json.loads(out.read_text())
    assert results["n-shot"]["toy_mc"] == 1 and results["n-samples"]["toy_mc"]["effective"] == 3
    assert results["results"]["toy_mc"]["acc,none"] in (0, 1 / 3, 2 / 3, 1)

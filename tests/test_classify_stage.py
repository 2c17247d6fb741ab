"""The classification stage end to end, from a tiny random Hugging Face Llama (GQA) and its tokenizer, on
MNLI-style sentence pairs with three string labels: the held-out accuracy it logs equals one computed directly,
and its export scores right-padded rows in transformers as the run does. (LoRA: tests/lm/test_classify.py.)"""
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

import configs.classify
import lm
from lm import hf, runs, stages
from lm.data import builders, schemas
from rl import reward as reward_lib
from test_hf_start import _checkpoint

LABELS = ["contradiction", "entailment", "neutral"]
FIELDS = "premise=text,hypothesis=text_pair"
THINGS = ["dog", "cat", "bird", "horse", "child", "farmer", "teacher", "cook"]


def _pairs(path):
    """MNLI-like rows (its column names), 36 of them, 12 per label."""
    rows = []
    for i, thing in enumerate(THINGS + THINGS[:4]):
        rows += [{"premise": f"The {thing} is sleeping in the sun.", "hypothesis": f"The {thing} is resting.",
                  "label": "entailment", "idx": 3 * i},
                 {"premise": f"The {thing} runs across the field.", "hypothesis": f"The {thing} is asleep.",
                  "label": "contradiction", "idx": 3 * i + 1},
                 {"premise": f"The {thing} looks at the sky.", "hypothesis": f"The {thing} is happy today {i}.",
                  "label": "neutral", "idx": 3 * i + 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def runs_(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    c = configs.classify.get_config("tiny")
    c.init_from, c.data.path, c.data.cache_dir = _checkpoint(root), _pairs(root / "mnli.jsonl"), str(root / "cache")
    c.data.field_map, c.data.seq_len, c.data.eval_fraction = FIELDS, 48, 0.25
    c.train.steps, c.train.eval_every, c.train.batch_size, c.checkpoint.async_save = 2, 2, 8, False
    full = stages.classify(c, str(root / "full"))
    return {"root": root, "path": c.data.path, "cache": c.data.cache_dir, "full": full}


def _held_out(r, tok):
    """The held-out rows as GPT-1 joins them, `[bos] text eos text_pair eos`, right-padded: `(ids, last index,
    class ids)`."""
    src = builders.data_source("classify", r["path"], "eval", cache_dir=r["cache"], eval_fraction=0.25,
                               field_map=FIELDS)
    rows = [{k: src[i][k].decode() for k in ("text", "text_pair", "label")} for i in range(len(src))]
    seqs = [[tok.bos_id] + tok.encode(r["text"]) + [tok.eos_id] + tok.encode(r["text_pair"]) + [tok.eos_id]
            for r in rows]
    width = max(map(len, seqs))
    return (np.asarray([s + [tok.pad_id] * (width - len(s)) for s in seqs]), np.asarray([len(s) - 1 for s in seqs]),
            np.asarray([LABELS.index(schemas.decode_label(r["label"])) for r in rows]))


def test_eval_accuracy_is_the_held_out_accuracy(runs_):
    cfg, params, tok = lm.load(runs_["full"])
    assert runs.labels(runs_["full"]) == LABELS and cfg.num_labels == 3 and not np.any(params["score"]["bias"])
    ids, last, labels = _held_out(runs_, tok)
    logits = np.asarray(jax.jit(lm.Transformer(cfg, head="scalar").apply)({"params": params}, ids))
    hits = logits[np.arange(len(ids)), last].argmax(-1) == labels
    logged = [json.loads(line) for line in open(os.path.join(runs_["full"], "metrics.jsonl"))]
    assert len(hits) >= 5 and "eval_accuracy" in logged[-1]
    np.testing.assert_allclose(logged[-1]["eval_accuracy"], hits.mean(), atol=1e-6)


def test_export_scores_right_padded_rows_as_the_run_does(runs_):
    out = hf.export_run(runs_["full"], runs_["root"] / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {str(i): n for i, n in enumerate(LABELS)} and config["label2id"]["neutral"] == 2
    cfg, params, tok = lm.load(runs_["full"])
    assert config["pad_token_id"] == tok.pad_id != tok.eos_id  # transformers reads the last non-pad token: our eos
    ids, last, _ = _held_out(runs_, tok)
    ours = np.asarray(lm.Transformer(cfg, head="scalar").apply({"params": params}, ids))[np.arange(len(ids)), last]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    assert theirs.shape == (len(ids), 3) and len(set(last.tolist())) > 1
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    # lm reads the export back as the classifier with its class names; it is no reward model.
    back_cfg, back = hf.load(out)
    assert back_cfg.num_labels == 3 and runs.labels(str(out)) == LABELS
    np.testing.assert_array_equal(back["score"]["kernel"], params["score"]["kernel"])
    with pytest.raises(ValueError, match="classifier with 3 labels, not a reward model"):
        reward_lib.load(str(out))


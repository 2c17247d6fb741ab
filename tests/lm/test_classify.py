"""Classification (lm.classify, lm.data.classify_dataset): the loss against NumPy on the last token's logits, the
two heads on one trunk, GPT-1's pair joining, label mapping, and bad rows named by file:row."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm import classify, data, peft, presets, sharding, train_step
from lm.data import builders, schemas
from lm.model import Transformer, with_score_head
from random_weights import random_params

CFG = presets.get("llama-tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_len=32,
                  num_labels=3)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_classification_loss_is_cross_entropy_at_the_last_token():
    rs = np.random.RandomState(0)
    logits, labels = rs.normal(size=(6, 3)).astype(np.float32), np.array([0, 2, 1, -1, 2, -1])
    loss, m = classify.classification_loss(jnp.asarray(logits), jnp.asarray(labels))
    keep = labels >= 0
    nll = -_log_softmax(logits)[keep, labels[keep]]
    np.testing.assert_allclose(float(loss), nll.mean(), rtol=1e-6)
    assert float(m["accuracy"]) == (logits[keep].argmax(-1) == labels[keep]).mean() and float(m["weight"]) == 4

    lm_params = random_params(CFG)
    params = with_score_head(CFG, lm_params, jax.random.key(1), head="lm+scalar")
    assert params["score"]["kernel"].shape == (32, 3) and not np.any(params["score"]["bias"])
    inputs = rs.randint(4, 64, (4, 10)).astype(np.int32)
    last = np.array([9, 5, 2, 7])
    inputs[np.arange(10)[None] > last[:, None]] = 0  # right padding
    loss_mask = (np.arange(10)[None] < last[:, None]).astype(np.float32)
    targets = np.concatenate([inputs[:, 1:], np.zeros((4, 1), np.int32)], 1)
    batch = {"inputs": inputs, "last_index": last, "labels": np.array([2, 0, 1, -1]), "targets": targets,
             "loss_mask": loss_mask}
    # The two heads on one trunk: the LM head's logits are the language model's.
    both = jax.jit(Transformer(CFG, head="lm+scalar").apply)({"params": params}, inputs)
    lm_logits, scores = (np.asarray(x) for x in both)  # [B, T, V], [B, T, 3]
    np.testing.assert_array_equal(lm_logits, jax.jit(Transformer(CFG).apply)({"params": lm_params}, inputs))
    want = -_log_softmax(scores[np.arange(4), last][:3])[np.arange(3), [2, 0, 1]].mean()
    # GPT-1's auxiliary LM loss adds 0.5 x the next-token cross-entropy over each row's tokens.
    grads, m = jax.jit(jax.grad(classify.classify_loss_fn(CFG, 0.5), has_aux=True))(params, batch, None)
    lm_nll = -np.take_along_axis(_log_softmax(lm_logits), targets[..., None], -1)[..., 0]
    want_lm = (lm_nll * loss_mask).sum() / loss_mask.sum()
    np.testing.assert_allclose([float(m["cls_loss"]), float(m["lm_loss"]), float(m["loss"])],
                               [want, want_lm, want + 0.5 * want_lm], rtol=1e-5)
    # The score bias (absent from GPT-1's W_y and from transformers' score layer) gets no gradient.
    assert not np.any(grads["score"]["bias"]) and np.abs(grads["score"]["kernel"]).max() > 0
    assert np.abs(grads["lm_head"]["kernel"]).max() > 0


def test_lora_trains_the_adapters_and_the_head_only():
    # The generic step on a frozen base, as the stage runs it with --config.peft.method=lora and the auxiliary loss:
    # the base keeps the LM head (frozen), the state holds the adapters and the score head.
    cfg = peft.adapt(CFG, peft.PeftConfig(method="lora", rank=4))
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    base = random_params(CFG)
    frozen = peft.frozen_base(cfg, lambda abstract: base, "lm+scalar", mesh)
    tx = optax.adam(1e-2)
    build = functools.partial(peft.boxed_trainable, cfg, head="lm+scalar")
    state, sh = train_step.init_state(build, tx, jax.random.PRNGKey(1), mesh)
    step = train_step.make_train_step(classify.classify_loss_fn(cfg, 0.5), tx, sh, mesh,
                                      frozen_shardings=frozen.shardings)
    rs = np.random.RandomState(0)
    inputs = rs.randint(4, 64, (8, 6)).astype(np.int32)
    batch = {"inputs": inputs, "last_index": np.full(8, 5), "labels": inputs[:, 2] % 3,
             "targets": np.roll(inputs, -1, 1),
             "loss_mask": np.ones((8, 6), np.float32)}
    before = jax.device_get(frozen.params)
    for _ in range(3):
        state, metrics = step(state, batch, frozen.params)
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert "['score']['kernel']" in names and "lm_head" in frozen.params
    assert all(n.startswith("['score']") or n.split("'")[-2] in peft.ADAPTER_LEAVES for n in names), names
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(frozen.params))
    assert np.abs(state.params["layers"]["attn"]["q"]["lora_b"]).max() > 0  # zero-initialised: it trained
    assert not np.any(state.params["score"]["bias"]) and np.isfinite(float(metrics["lm_loss"]))


class _CharTokenizer:
    """One id per character: expected ids are easy to write down."""
    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text):
        return [3 + ord(c) % 50 for c in text]


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_pairs_are_joined_gpt1_style_and_labels_mapped(tmp_path):
    rows = [{"sentence1": "a cat sat", "sentence2": "an animal sat", "label": "entailment", "idx": 0},
            {"sentence1": "it rains", "sentence2": "it is dry", "label": "contradiction", "idx": 1},
            {"sentence1": "he left", "sentence2": "he was sad", "label": "neutral", "idx": 2},
            {"sentence1": "two dogs", "sentence2": "some dogs", "label": "entailment", "idx": 3},
            {"sentence1": "a red car", "sentence2": "a blue car", "label": "contradiction", "idx": 4}]
    path = _write(tmp_path / "mnli.jsonl", rows)
    fm, cache = "sentence1=text,sentence2=text_pair", str(tmp_path / "cache")
    src = builders.data_source("classify", path, "train", cache_dir=cache, eval_fraction=0.0, field_map=fm)
    labels = schemas.label_names((r["source"].decode(), schemas.decode_label(r["label"])) for r in src)
    assert labels == ["contradiction", "entailment", "neutral"]  # sorted names
    tok, t = _CharTokenizer(), 32
    kw = dict(labels=labels, seq_len=t, batch_size=5, seed=0, num_epochs=1, eval_fraction=0.0, field_map=fm,
              cache_dir=cache)
    batch = next(iter(data.classify_dataset(path, tok, **kw)))
    want = {}
    for r in rows:
        ids = [1] + tok.encode(r["sentence1"]) + [2] + tok.encode(r["sentence2"]) + [2]
        want[tuple(ids + [0] * (t - len(ids)))] = (labels.index(r["label"]), len(ids))
    assert sorted(want) == sorted(tuple(x) for x in batch["inputs"].tolist())
    for inputs, targets, mask, last, label in zip(batch["inputs"], batch["targets"], batch["loss_mask"],
                                                  batch["last_index"], batch["labels"]):
        wanted, n = want[tuple(inputs.tolist())]
        assert (label, last, inputs[last]) == (wanted, n - 1, tok.eos_id)
        np.testing.assert_array_equal(targets[:n - 1], inputs[1:n])
        assert mask.sum() == n - 1 and mask[:n - 1].all()
    # A finite pass gives both processes the same number of batches; the shorter one pads with unlabelled rows.
    shards = [list(data.classify_dataset(path, tok, **dict(kw, batch_size=2), process_index=i, process_count=2))
              for i in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 2
    assert [sum(int((b["labels"] >= 0).sum()) for b in s) for s in shards] == [3, 2]
    # A row longer than seq_len keeps its first tokens and the final eos, where the label is read.
    cut = next(iter(data.classify_dataset(path, tok, **dict(kw, seq_len=8, overlong="truncate"))))
    assert (cut["last_index"] == 7).all() and (cut["inputs"][:, 7] == tok.eos_id).all()

    # Integer labels are their own class ids; data.labels names them, or orders string labels.
    ints = [("f:1", 2), ("f:2", 0)]
    assert schemas.label_names(ints) == ["0", "1", "2"]
    assert schemas.label_names(ints, ["neg", "neutral", "pos"]) == ["neg", "neutral", "pos"]
    assert schemas.label_names([("f:1", "pos"), ("f:2", "neg")], ["pos", "neg"]) == ["pos", "neg"]


@pytest.mark.parametrize("rows,error", [
    ([{"text": "fine", "label": "pos"}, {"text": "no label"}], r":2: row does not match .*missing key 'label'"),
    ([{"text": "fine", "label": "pos"}, {"text": "  ", "label": "neg"}], r":2: 'text' is empty"),
    ([{"text": "a", "text_pair": "b", "label": 1}, {"text": "a", "text_pair": "", "label": 0}],
     r":2: 'text_pair' is empty"),
    ([{"text": "fine", "label": "pos"}, {"text": "odd", "label": True}], r":2: 'label' must be an integer .*True"),
    ([{"text": "no label at all"}], r":1: unrecognised classify row .*missing key 'label'"),
])
def test_bad_rows_name_their_file_and_row(tmp_path, rows, error):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad\.jsonl" + error):
        list(schemas.records("classify", path, builders.read_rows(path), {}))


def test_bad_labels_name_their_row():
    rows = [("f.jsonl:1", "pos"), ("f.jsonl:2", "neg"), ("f.jsonl:3", "meh")]
    with pytest.raises(ValueError, match=r"f\.jsonl:3: label 'meh' is not one of the classes \['neg', 'pos'\]"):
        schemas.label_names(rows, ["neg", "pos"])
    with pytest.raises(ValueError, match=r"f:2: label 'pos' is a class name, but the first class id is at f:1"):
        schemas.label_names([("f:1", 0), ("f:2", "pos")])
    with pytest.raises(ValueError, match=r"f:2: label -1 is not a class id"):
        schemas.label_names([("f:1", 0), ("f:2", -1)])
    with pytest.raises(ValueError, match=r"f:1: label 2 is not a class id in \[0, 2\)"):
        schemas.label_names([("f:1", 2)], ["neg", "pos"])
    with pytest.raises(ValueError, match="aux_lm_coef=-1.0 must be >= 0"):
        classify.ClassifyConfig(aux_lm_coef=-1.0)

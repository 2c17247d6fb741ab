"""lm.embed: a row's vector equals NumPy pooling of the model's hidden states over that row alone (no padding,
no other rows), for a causal and a prefix-LM (GLM) model; unit norms; clear errors; zero-shot classification
is the argmax of cosine similarity; the bundled sentiment data is well formed."""
import collections
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lm
from lm import embedding, presets
from lm.generation import pad_prompts
from lm.model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# 16, 2 and 23 tokens: together one [4, 32] batch (a filler row, padding); the first alone fills a width-16
# bucket exactly, so it runs with no padding and no other row. Tests reuse these shapes: each new one compiles.
ROWS = [[5, 17, 42, 9, 301, 77, 12, 1, 2, 3, 4, 5, 6, 7, 8, 9], [3, 250], list(range(100, 123))]
FAMILIES = ["llama-tiny", "glm-tiny"]  # causal; prefix-LM with 2D positions


@functools.lru_cache(maxsize=None)
def model(family):
    """`(cfg, params)`: random parameters drawn in NumPy (no initialiser to compile), large enough that
    attention is far from uniform, so a pad token or another row leaking into a vector would show."""
    cfg = presets.get(family)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda k: lm.init_params(cfg, k), jax.random.key(0))

    def draw(path, s):  # norm scales around 1, everything else (biases included) around 0
        scale = path[-1].key == "scale" and "norm" in jax.tree_util.keystr(path)
        return jnp.asarray(scale + rng.normal(size=s.shape) * 0.1, s.dtype)

    return cfg, jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("family", FAMILIES)
def test_pooling_equals_numpy_over_each_rows_hidden_states(family):
    cfg, params = model(family)
    tokens, lengths = pad_prompts(ROWS + [[1]], 32)  # the [4, 32] batch embed runs
    forward = jax.jit(lambda p, t, n: Transformer(cfg).apply({"params": p}, t, prefix_len=n, return_hidden=True)[1])
    hidden = np.asarray(forward(params, tokens, lengths))  # [4, 32, d_model]; prefix_len = row length (GLM)
    mean = lm.embed(cfg, params, ROWS, pooling="mean")
    last = lm.embed(cfg, params, ROWS, pooling="last")
    assert mean.shape == last.shape == (len(ROWS), cfg.d_model) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, [hidden[b, :len(r)].mean(0) for b, r in enumerate(ROWS)], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(last, [hidden[b, len(r) - 1] for b, r in enumerate(ROWS)], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_vector_independent_of_padding_and_other_rows(family):
    cfg, params = model(family)
    together = lm.embed(cfg, params, ROWS)
    for b in (0, 1):  # alone: width 16, no other row; row 0 also without any padding
        np.testing.assert_allclose(lm.embed(cfg, params, [ROWS[b]])[0], together[b], atol=1e-6, rtol=1e-6)
    more = [ROWS[2], [7] * 30, ROWS[1], ROWS[0], [9]]  # other neighbours and filler rows, two batches
    np.testing.assert_allclose(lm.embed(cfg, params, more, batch_size=4)[[3, 2, 0]], together, atol=1e-6, rtol=1e-6)


def test_normalize_gives_unit_vectors_in_the_same_direction():
    cfg, params = model("llama-tiny")
    raw = lm.embed(cfg, params, ROWS)
    unit = lm.embed(cfg, params, ROWS, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=-1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("rows, kwargs, message", [
    ([], {}, "token_lists is empty"),
    ([[1, 2], []], {}, "row 1 is empty"),
    ([[1, -1]], {}, r"row 0 has token ids \[-1\] outside the vocabulary"),
    ([[3], [1, 2, 512]], {}, r"row 1 has token ids \[512\] outside the vocabulary \[0, 512\)"),
    ([[1] * 257], {}, "row 0 has 257 tokens, more than 256"),
    ([[1, 2]], {"pooling": "max"}, "pooling must be one of"),
    ([[1, 2]], {"batch_size": 0}, "batch_size must be >= 1"),
])
def test_bad_inputs_raise_naming_the_problem(rows, kwargs, message):
    cfg, params = model("llama-tiny")
    with pytest.raises(ValueError, match=message):
        lm.embed(cfg, params, rows, **kwargs)


def test_zero_shot_picks_the_label_closest_in_cosine():
    cfg, params = model("llama-tiny")
    labels = [[11, 12, 13], [200, 201]]
    texts = [ROWS[0], ROWS[2], *labels]  # a label description has cosine 1 with itself: a known answer
    preds = embedding.zero_shot(cfg, params, texts, labels)
    t, l_ = lm.embed(cfg, params, texts), lm.embed(cfg, params, labels)
    cosine = (t @ l_.T) / np.linalg.norm(t, axis=-1)[:, None] / np.linalg.norm(l_, axis=-1)[None, :]
    assert preds.shape == (4,)
    np.testing.assert_array_equal(preds, np.argmax(cosine, axis=-1))
    assert preds.tolist()[2:] == [0, 1]


def test_bundled_reviews_parse_balanced_in_both_languages():
    with open(os.path.join(ROOT, "data", "sentiment", "reviews.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert all(set(r) == {"text", "label", "lang"} and r["text"].strip() for r in rows)
    counts = collections.Counter((r["lang"], r["label"]) for r in rows)
    assert set(counts) == {(lang, label) for lang in ("en", "zh") for label in ("positive", "negative")}
    assert len(set(counts.values())) == 1 and min(counts.values()) >= 100, counts
    assert len({r["text"] for r in rows}) == len(rows)  # no repeats
    descriptions = ("a good review", "a bad review", "好评", "差评")
    assert not [r["text"] for r in rows if any(d in r["text"].lower() for d in descriptions)]

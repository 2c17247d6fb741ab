"""GLM blank infilling: every masked token predicted exactly once, positions as in the paper, part A intact."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lm.data.glm import GlmTokens, blank_infilling, sample_spans

IDS = GlmTokens(mask=4, gmask=5, sop=6, eop=7)


def spans_of(ex):
    """Part B split into spans: list of (mask position in A, inputs, targets, intra-span positions)."""
    a = ex["prefix_len"]
    starts = [t for t in range(a, len(ex["inputs"])) if ex["inputs"][t] == IDS.sop]
    ends = starts[1:] + [len(ex["inputs"])]
    return [(int(ex["positions"][s, 0]), ex["inputs"][s:e], ex["targets"][s:e], ex["positions"][s:e])
            for s, e in zip(starts, ends)]


def reconstruct(ex):
    """The original text from part A with each mask replaced by the tokens its span predicts."""
    part_a = ex["inputs"][:ex["prefix_len"]]
    fills = {pos: targets[:-1] for pos, _, targets, _ in spans_of(ex)}
    out = []
    for i, tok in enumerate(part_a):
        out.extend(fills.pop(i) if tok in (IDS.mask, IDS.gmask) else [tok])
    assert not fills, f"spans point at non-mask positions {sorted(fills)}"
    return np.asarray(out)


def check_example(tokens, ex):
    n, a, total = len(tokens), ex["prefix_len"], len(ex["inputs"])
    part_a = ex["inputs"][:a]
    mask_positions = np.flatnonzero(np.isin(part_a, [IDS.mask, IDS.gmask]))
    spans = spans_of(ex)
    # Each mask token in A has exactly one span in B, and the spans restore the text exactly.
    assert sorted(pos for pos, *_ in spans) == mask_positions.tolist()
    np.testing.assert_array_equal(reconstruct(ex), tokens)
    assert total == n + 2 * len(spans)
    # Loss exactly on part B; each masked token appears once among the predicted targets (plus one eop per span).
    np.testing.assert_array_equal(ex["loss_mask"], (np.arange(total) >= a).astype(np.float32))
    assert int(ex["loss_mask"].sum()) == (n - (a - len(spans))) + len(spans)
    # Part A positions are (i, 0); part B: (mask position, 1..len) and teacher forcing inside each span.
    np.testing.assert_array_equal(ex["positions"][:a], np.stack([np.arange(a), np.zeros(a, int)], -1))
    for pos, inputs, targets, positions in spans:
        assert inputs[0] == IDS.sop and targets[-1] == IDS.eop
        np.testing.assert_array_equal(inputs[1:], targets[:-1])
        np.testing.assert_array_equal(positions[:, 0], pos)
        np.testing.assert_array_equal(positions[:, 1], np.arange(1, len(inputs) + 1))
    # Spans never touch: no two masks in a row in part A.
    assert not np.any(np.diff(mask_positions) == 1)
    return spans


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1), gmask_prob=st.sampled_from([0.0, 1.0, 0.5]))
def test_every_masked_token_predicted_once(n, seed, gmask_prob):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 1000, size=n).astype(np.int32)
    ex = blank_infilling(tokens, np.random.default_rng(seed), IDS, gmask_prob=gmask_prob)
    spans = check_example(tokens, ex)
    if ex["mode"] == "gmask":
        (pos, inputs, _, _), = spans
        assert ex["inputs"][ex["prefix_len"] - 1] == IDS.gmask and pos == ex["prefix_len"] - 1
        assert (n + 1) // 2 <= len(inputs) - 1 <= n
    else:
        assert gmask_prob < 1.0
        assert sum(len(inputs) - 1 for _, inputs, _, _ in spans) == max(1, round(0.15 * n))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 200), extra=st.integers(2, 30), seed=st.integers(0, 2**32 - 1))
def test_max_len_is_respected(n, extra, seed):
    tokens = np.arange(n, dtype=np.int32) + 20
    ex = blank_infilling(tokens, np.random.default_rng(seed), IDS, max_len=n + extra, gmask_prob=0.3)
    assert len(ex["inputs"]) <= n + extra
    check_example(tokens, ex)


def test_span_lengths_follow_poisson_and_order_is_shuffled():
    rng = np.random.default_rng(0)
    lengths, shuffled = [], 0
    for _ in range(200):
        spans = sample_spans(2000, rng, mask_ratio=0.15, poisson_lambda=3.0)
        lengths += [length for _, length in spans[:-1]]  # the last span is cut to hit 15% exactly
        starts = [s for s, _ in spans]
        assert starts == sorted(starts)
        ex = blank_infilling(np.arange(100, dtype=np.int32) + 20, rng, IDS)
        order = [pos for pos, *_ in spans_of(ex)]
        shuffled += order != sorted(order)
    # max(1, Poisson(3)) has mean 3 + e^-3; 200 * ~100 spans make the standard error ~0.012.
    assert abs(np.mean(lengths) - (3 + np.exp(-3))) < 0.06
    assert shuffled > 150


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        sample_spans(0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="1-D"):
        blank_infilling(np.zeros((2, 3), np.int32), np.random.default_rng(0), IDS)
    with pytest.raises(ValueError, match="max_len=11"):
        blank_infilling(np.zeros(10, np.int32), np.random.default_rng(0), IDS, max_len=11)

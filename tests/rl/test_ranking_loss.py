"""InstructGPT's K-wise ranking loss and the DPO loss against NumPy loops (ties, padding, weighting)."""
import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from rl import dpo, reward


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _np_ranking(scores, ranks):
    prompt_losses, n_correct, margins = [], 0, []
    for s, r in zip(scores, ranks):
        pairs = []
        for i, j in itertools.combinations(range(len(r)), 2):
            if r[i] < 0 or r[j] < 0 or r[i] == r[j]:
                continue
            w, l = (i, j) if r[i] < r[j] else (j, i)
            pairs.append(s[w] - s[l])
        if pairs:
            prompt_losses.append(-sum(_logsig(d) for d in pairs) / len(pairs))
        n_correct += sum(d > 0 for d in pairs)
        margins += pairs
    return float(np.mean(prompt_losses)), n_correct / len(margins), float(np.mean(margins)), len(margins)


def test_ranking_loss_with_ties_and_padding():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 4)).astype(np.float32)
    ranks = np.array([[0, 1, 2, 3],      # full ranking: 6 pairs
                      [2, 0, 1, 1],      # A2 > A3 = A4 > A1: 5 untied pairs
                      [0, 1, -1, -1],    # K=2 padded to 4: 1 pair
                      [1, 1, 1, -1],     # all tied: no pairs, must not count as a prompt
                      [3, 0, -1, 0]], np.int32)
    loss, m = reward.ranking_loss(jnp.asarray(scores), jnp.asarray(ranks))
    want_loss, want_acc, want_margin, n = _np_ranking(scores, ranks)
    assert abs(float(loss) - want_loss) < 1e-5
    assert abs(float(m["accuracy"]) - want_acc) < 1e-6
    assert abs(float(m["margin"]) - want_margin) < 1e-5
    assert int(m["pairs"]) == n == 6 + 5 + 1 + 0 + 2


def test_each_prompt_weighs_the_same():
    # A prompt with 6 pairs and one with 1 pair: the batch loss is the plain mean of the two prompt losses.
    scores = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
    ranks = jnp.array([[0, 1, 2, 3], [0, 1, -1, -1]])
    loss, _ = reward.ranking_loss(scores, ranks)
    p0 = -(3 * _logsig(1.0) + 3 * _logsig(0.0)) / 6
    p1 = -_logsig(-3.0)
    assert abs(float(loss) - (p0 + p1) / 2) < 1e-6


def test_ranking_loss_is_permutation_invariant_and_shift_invariant():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(3, 5)).astype(np.float32)
    ranks = rng.integers(-1, 3, size=(3, 5)).astype(np.int32)
    perm = rng.permutation(5)
    a, _ = reward.ranking_loss(jnp.asarray(scores), jnp.asarray(ranks))
    b, _ = reward.ranking_loss(jnp.asarray(scores[:, perm] + 7.0), jnp.asarray(ranks[:, perm]))
    assert abs(float(a) - float(b)) < 1e-5


def test_ranking_loss_bad_input():
    with pytest.raises(ValueError, match=r"scores \(2, 3\) and ranks \(2, 4\)"):
        reward.ranking_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        reward.ranking_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)))


def _np_dpo(pc, pr, rc, rr, beta, eps):
    z = beta * ((pc - pr) - (rc - rr))
    return -(1 - eps) * _logsig(z) - eps * _logsig(-z)


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_loss_matches_numpy(beta, eps):
    rng = np.random.default_rng(2)
    pc, pr, rc, rr = (rng.normal(-20, 3, size=6) for _ in range(4))
    losses, _ = dpo.dpo_loss(pc, pr, rc, rr, beta, eps)
    for i in range(6):
        assert abs(float(losses[i]) - _np_dpo(pc[i], pr[i], rc[i], rr[i], beta, eps)) < 1e-4


def test_ranked_dpo_loss_matches_pairwise_numpy():
    rng = np.random.default_rng(3)
    pol, ref = rng.normal(-20, 3, size=(3, 4)), rng.normal(-20, 3, size=(3, 4))
    ranks = np.array([[0, 1, 1, 2], [1, 0, -1, -1], [0, 0, 0, 0]], np.int32)
    loss, m = dpo.ranked_dpo_loss(jnp.asarray(pol), jnp.asarray(ref), jnp.asarray(ranks), 0.1)
    prompt_losses, correct, n = [], 0, 0
    for b in range(3):
        ls = []
        for i, j in itertools.permutations(range(4), 2):
            if ranks[b, i] >= 0 and ranks[b, j] >= 0 and ranks[b, i] < ranks[b, j]:
                ls.append(_np_dpo(pol[b, i], pol[b, j], ref[b, i], ref[b, j], 0.1, 0.0))
                correct += (pol[b, i] - ref[b, i]) > (pol[b, j] - ref[b, j])
                n += 1
        if ls:
            prompt_losses.append(np.mean(ls))
    assert abs(float(loss) - np.mean(prompt_losses)) < 1e-4
    assert abs(float(m["reward_accuracy"]) - correct / n) < 1e-6
    with pytest.raises(ValueError, match="must share one shape"):
        dpo.dpo_loss(np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(2), 0.1)

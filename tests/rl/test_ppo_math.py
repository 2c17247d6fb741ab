"""PPO's pure functions against straightforward NumPy loops."""
import math

import jax
import numpy as np
import pytest

from rl import ppo


def _rollout(seed, b=4, t=7):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, size=b)
    lengths[0] = t  # one full row
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    return rng, mask


def _np_gae(rewards, values, mask, gamma, lam):
    b, t = rewards.shape
    adv = np.zeros((b, t))
    for i in range(b):
        n = int(mask[i].sum())
        last = 0.0
        for s in reversed(range(n)):
            next_v = values[i, s + 1] if s + 1 < n else 0.0
            delta = rewards[i, s] + gamma * next_v - values[i, s]
            last = delta + gamma * lam * last
            adv[i, s] = last
    returns = (adv + values) * mask
    return adv, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_matches_numpy_loop(gamma, lam):
    rng, mask = _rollout(0)
    rewards = rng.normal(size=mask.shape).astype(np.float32) * mask
    values = rng.normal(size=mask.shape).astype(np.float32)  # garbage on padding must not leak in
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = _np_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, atol=1e-5)


def test_gae_lambda_one_is_discounted_return_minus_value():
    rng, mask = _rollout(1)
    rewards = rng.normal(size=mask.shape).astype(np.float32) * mask
    values = rng.normal(size=mask.shape).astype(np.float32) * mask
    adv, ret = ppo.gae(rewards, values, mask, 0.9, 1.0)
    for i in range(mask.shape[0]):
        n = int(mask[i].sum())
        for s in range(n):
            g = sum(0.9 ** (u - s) * rewards[i, u] for u in range(s, n))
            assert abs(ret[i, s] - g) < 1e-5


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="gae"):
        ppo.gae(np.zeros((2, 3)), np.zeros((2, 4)), np.ones((2, 3)), 1.0, 0.95)


def test_kl_estimators():
    rng = np.random.default_rng(2)
    lp, ref = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    k1 = np.array(ppo.kl_penalty(lp, ref, "k1"))
    k2 = np.array(ppo.kl_penalty(lp, ref, "k2"))
    k3 = np.array(ppo.kl_penalty(lp, ref, "k3"))
    for idx in np.ndindex(lp.shape):
        d = lp[idx] - ref[idx]
        r = math.exp(ref[idx] - lp[idx])
        assert abs(k1[idx] - d) < 1e-5
        assert abs(k2[idx] - 0.5 * d * d) < 1e-5
        assert abs(k3[idx] - ((r - 1) - math.log(r))) < 1e-4
    assert (k3 >= 0).all()
    with pytest.raises(ValueError, match="k4"):
        ppo.kl_penalty(lp, ref, "k4")


def test_kl_estimators_are_unbiased_for_kl():
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.5, 0.3])
    exact = float((p * np.log(p / q)).sum())
    lp, lq = np.log(p), np.log(q)
    for kind in ("k1", "k3"):  # expectation under p, computed exactly
        est = float((p * np.array(ppo.kl_penalty(lp, lq, kind))).sum())
        assert abs(est - exact) < 1e-6, kind


def test_whiten_matches_numpy():
    rng, mask = _rollout(3)
    x = rng.normal(3.0, 2.0, size=mask.shape).astype(np.float32)
    vals = x[mask > 0].astype(np.float64)
    mean, var = vals.mean(), vals.var(ddof=1)
    want = (x - mean) / np.sqrt(var + 1e-8) * mask
    np.testing.assert_allclose(ppo.whiten(x, mask), want, atol=1e-5)
    np.testing.assert_allclose(ppo.whiten(x, mask, shift_mean=False), (want + mean) * mask, atol=1e-5)


def test_policy_loss_matches_numpy():
    rng, mask = _rollout(4)
    old = rng.normal(size=mask.shape)
    new = old + rng.normal(0, 0.3, size=mask.shape)
    adv = rng.normal(size=mask.shape)
    loss, m = ppo.policy_loss(new, old, adv, mask, 0.2)
    total = clipped = kl = 0.0
    for idx in zip(*np.nonzero(mask)):
        r = math.exp(new[idx] - old[idx])
        a, b = -adv[idx] * r, -adv[idx] * min(max(r, 0.8), 1.2)
        total += max(a, b)
        clipped += float(b > a)
        kl += (r - 1) - math.log(r)
    n = mask.sum()
    assert abs(loss - total / n) < 1e-5
    assert abs(m["policy_clipfrac"] - clipped / n) < 1e-6
    assert abs(m["approx_kl"] - kl / n) < 1e-5
    assert 0 < m["policy_clipfrac"] < 1


def test_policy_loss_gradient_vanishes_when_clipped():
    mask = np.ones((1, 2), np.float32)
    old = np.zeros((1, 2), np.float32)
    adv = np.array([[1.0, -1.0]], np.float32)
    # token 0 ratio 1.5 with positive advantage and token 1 ratio 0.5 with negative: both clipped.
    new = np.log(np.array([[1.5, 0.5]], np.float32))
    g = jax.grad(lambda n: ppo.policy_loss(n, old, adv, mask, 0.2)[0])(new)
    np.testing.assert_allclose(g, 0.0)


def test_value_loss_matches_numpy():
    rng, mask = _rollout(5)
    old = rng.normal(size=mask.shape)
    new = old + rng.normal(0, 0.5, size=mask.shape)
    ret = rng.normal(size=mask.shape)
    loss, m = ppo.value_loss(new, old, ret, mask, 0.2)
    total = nclip = 0.0
    for idx in zip(*np.nonzero(mask)):
        vc = old[idx] + min(max(new[idx] - old[idx], -0.2), 0.2)
        a, b = (new[idx] - ret[idx]) ** 2, (vc - ret[idx]) ** 2
        total += 0.5 * max(a, b)
        nclip += float(abs(new[idx] - old[idx]) > 0.2 and b > a)
    assert abs(loss - total / mask.sum()) < 1e-5
    assert abs(m["value_clipfrac"] - nclip / mask.sum()) < 1e-6
    assert 0 < m["value_clipfrac"] < 1


def test_entropy_and_token_logprobs():
    rng, mask = _rollout(6, t=5)
    logits = rng.normal(size=mask.shape + (11,)).astype(np.float32)
    tokens = rng.integers(0, 11, size=mask.shape)
    total = 0.0
    for idx in zip(*np.nonzero(mask)):
        p = np.exp(logits[idx] - logits[idx].max())
        p /= p.sum()
        total += -(p * np.log(p)).sum()
    assert abs(ppo.entropy(logits, mask) - total / mask.sum()) < 1e-5
    lp = np.array(ppo.token_logprobs(logits, tokens, temperature=0.7))
    z = logits / 0.7
    for idx in np.ndindex(tokens.shape):
        row = z[idx] - z[idx].max()
        want = row[tokens[idx]] - np.log(np.exp(row).sum())
        assert abs(lp[idx] - want) < 1e-5


def test_kl_controller():
    assert ppo.update_kl_coef(0.2, 100.0, 256, adaptive=False) == 0.2
    # Ziegler et al.: error clipped to +-0.2, step scaled by n_steps / horizon.
    up = ppo.update_kl_coef(0.2, 100.0, 256, adaptive=True, target=6.0, horizon=10000)
    assert abs(up - 0.2 * (1 + 0.2 * 256 / 10000)) < 1e-7
    mid = ppo.update_kl_coef(0.2, 6.6, 500, adaptive=True, target=6.0, horizon=10000)
    assert abs(mid - 0.2 * (1 + 0.1 * 500 / 10000)) < 1e-7
    down = ppo.update_kl_coef(0.2, 0.0, 256, adaptive=True, target=6.0, horizon=10000)
    assert down < 0.2


def test_token_rewards_and_eos_penalty():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    kl = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    scores = np.array([2.0, -1.0, 5.0], np.float32)
    has_eos = np.array([True, False, True])
    s = np.array(ppo.score_with_eos_penalty(scores, has_eos, 1.5))
    np.testing.assert_allclose(s, [2.0, -2.5, 5.0])
    np.testing.assert_allclose(ppo.score_with_eos_penalty(scores, has_eos, None), scores)
    r = np.array(ppo.token_rewards(s, kl, mask, 0.1))
    want = -0.1 * kl * mask
    want[0, 2] += 2.0
    want[1, 0] += -2.5  # an empty row gets nothing
    np.testing.assert_allclose(r, want, atol=1e-6)
    with pytest.raises(ValueError, match="scores"):
        ppo.token_rewards(scores[:2], kl, mask, 0.1)

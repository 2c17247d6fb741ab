"""The critic-free RL algorithms: each advantage / aggregation / selection function against a NumPy loop on
random ragged cases (ties, masks, groups of one, all-equal rewards), and every algorithm of the one trainer
raising a verifiable reward (the share of responses' tokens equal to 7) on one device, skipping the update of
a non-finite reward, with the same losses on an 8-device mesh."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm import sharding, presets
from lm.model import init_params
from rl import algorithms as alg
from rl import ppo
from rl import ppo_step as pt


def _rewards(rng, groups, g, ties):
    r = rng.normal(size=groups * g)
    if ties:  # few distinct values: many ties inside groups, some groups all equal
        r = np.round(r)
    return r.astype(np.float32)


def _ragged_mask(rng, b, t):
    lengths = rng.integers(0, t + 1, size=b)
    lengths[0] = t
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)


CASES = [(g, ties, seed) for g in (1, 2, 3, 5) for ties in (False, True) for seed in range(2)]


@pytest.mark.parametrize("g,ties,seed", CASES)
def test_baselines_match_numpy_loops(g, ties, seed):
    rng = np.random.default_rng(seed)
    groups = 4
    r = _rewards(rng, groups, g, ties)
    grpo, drgrpo, rloo, untied = (np.zeros_like(r) for _ in range(4))
    best, worst, differ = [], [], []
    greedy = rng.normal(size=groups).astype(np.float32)
    remax = np.zeros_like(r)
    for p in range(groups):
        rows = list(range(p * g, (p + 1) * g))
        vals = [float(r[i]) for i in rows]
        mean = sum(vals) / g
        std = (sum((v - mean) ** 2 for v in vals) / max(g - 1, 1)) ** 0.5
        for i in rows:
            drgrpo[i] = r[i] - mean
            grpo[i] = (r[i] - mean) / (std + 1e-4)
            rloo[i] = 0.0 if g == 1 else r[i] - (sum(vals) - r[i]) / (g - 1)
            remax[i] = r[i] - greedy[p]
            untied[i] = float(max(vals) > min(vals))
        best.append(rows[vals.index(max(vals))])
        worst.append(rows[vals.index(min(vals))])
        differ.append(max(vals) > min(vals))
    np.testing.assert_allclose(alg.group_advantages(r, g), grpo, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(alg.group_advantages(r, g, scale=False), drgrpo, atol=1e-6)
    np.testing.assert_allclose(alg.leave_one_out_advantages(r, g), rloo, atol=1e-5)
    np.testing.assert_allclose(alg.baseline_advantages(r, greedy, g), remax, atol=1e-6)
    np.testing.assert_array_equal(alg.untied_groups(r, g), untied)
    b, w, d = alg.best_and_worst(r, g)
    np.testing.assert_array_equal(b, best)
    np.testing.assert_array_equal(w, worst)
    np.testing.assert_array_equal(d, differ)


def test_equal_rewards_give_zero_advantages_without_nan():
    r = np.full(12, 0.7, np.float32)
    for g in (1, 3, 4):
        for adv in (alg.group_advantages(r, g), alg.group_advantages(r, g, scale=False),
                    alg.leave_one_out_advantages(r, g), alg.baseline_advantages(r, np.full(12 // g, 0.7), g)):
            np.testing.assert_array_equal(np.asarray(adv), 0.0)
        assert not np.asarray(alg.untied_groups(r, g)).any()
    mask = np.ones((4, 5), np.float32)
    adv = alg.reinforce_pp_advantages(jnp.zeros((4, 5)), mask)
    assert np.isfinite(adv).all() and np.abs(adv).max() == 0.0
    with pytest.raises(ValueError, match="divisible by the group size 5"):
        alg.group_advantages(r, 5)


@pytest.mark.parametrize("seed", range(3))
def test_reinforce_pp_returns_whitened_over_the_batch(seed):
    rng = np.random.default_rng(seed)
    b, t, gamma = 5, 7, 0.9
    mask = _ragged_mask(rng, b, t)
    rewards = (rng.normal(size=(b, t)) * mask).astype(np.float32)
    ret = np.zeros((b, t))
    for i in range(b):
        acc = 0.0
        for j in reversed(range(t)):
            acc = (rewards[i, j] + gamma * acc) * mask[i, j]
            ret[i, j] = acc
    m = mask.astype(bool)
    mean, std = ret[m].mean(), ret[m].std(ddof=1)
    want = np.where(m, (ret - mean) / np.sqrt(std ** 2 + 1e-8), 0.0)
    np.testing.assert_allclose(alg.reinforce_pp_advantages(rewards, mask, gamma), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_aggregations_and_asymmetric_clip_match_numpy(seed):
    rng = np.random.default_rng(seed)
    b, t = 6, 5
    mask = _ragged_mask(rng, b, t)
    mask[-1] = 0.0  # a sequence without tokens (a filtered or empty one)
    x = rng.normal(size=(b, t)).astype(np.float32)
    token = sum(x[i, j] for i in range(b) for j in range(t) if mask[i, j]) / mask.sum()
    seqs = [sum(x[i, j] for j in range(t) if mask[i, j]) / mask[i].sum() for i in range(b) if mask[i].sum()]
    total = sum(x[i, j] for i in range(b) for j in range(t) if mask[i, j])
    np.testing.assert_allclose(ppo.aggregate(x, mask, "token_mean"), token, rtol=1e-5)
    np.testing.assert_allclose(ppo.aggregate(x, mask, "seq_mean"), np.mean(seqs), rtol=1e-5)
    np.testing.assert_allclose(ppo.aggregate(x, mask, "seq_sum", horizon=8), total / (b * 8), rtol=1e-5)

    logp, old = (rng.normal(size=(b, t)).astype(np.float32) * 0.5 for _ in range(2))
    adv = rng.normal(size=(b, t)).astype(np.float32)
    lo, hi = 0.2, 0.28
    per = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            ratio = np.exp(logp[i, j] - old[i, j])
            per[i, j] = max(-adv[i, j] * ratio, -adv[i, j] * min(max(ratio, 1 - lo), 1 + hi))
    want = np.mean([per[i, :][mask[i] > 0].mean() for i in range(b) if mask[i].sum()])
    got, _ = ppo.policy_loss(logp, old, adv, mask, lo, clip_high=hi, agg="seq_mean")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    sym, _ = ppo.policy_loss(logp, old, adv, mask, lo)
    asym_same, _ = ppo.policy_loss(logp, old, adv, mask, lo, clip_high=lo)
    np.testing.assert_array_equal(sym, asym_same)


def test_config_errors_name_the_field():
    assert alg.RLConfig(algorithm="grpo").group_size == 8 and alg.RLConfig(algorithm="grpo").kl_in == "loss"
    assert alg.RLConfig(algorithm="rloo").kl_in == "reward" and alg.RLConfig().group_size == 1
    with pytest.raises(ValueError, match="rl.algorithm='gpro' is not one of"):
        alg.RLConfig(algorithm="gpro")
    with pytest.raises(ValueError, match="rl.group_size >= 2"):
        alg.RLConfig(algorithm="rloo", group_size=1)
    with pytest.raises(ValueError, match="rl.loss_agg='sum'"):
        alg.RLConfig(algorithm="grpo", loss_agg="sum")


# Every algorithm through the trainer ----------------------------------------------------------------------------

CFG = presets.get("llama-tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_len=32)
HP = pt.PPOConfig(response_length=8, epochs=2, mini_batches=2, kl_coef=0.01)
TX = optax.adam(1e-2)
TARGET, EOS, PAD = 7, 2, 0
# Four samples per prompt everywhere (ReMax and REINFORCE++ take any number), online DPO's pair the best and
# worst of them; GRPO with DAPO's and Dr. GRPO's options (their math is tested above against NumPy).
RECIPES = {"grpo": {"clip_high": 0.28, "filter_ties": True, "scale_rewards": False, "loss_agg": "seq_sum"},
           "rloo": {}, "remax": {}, "reinforce_pp": {}, "best_of_n": {}, "online_dpo": {"dpo_beta": 0.5}}
ITERATIONS = 12


def sevens(prompt_tokens, prompt_lengths, out):
    """The verifiable reward: the share of a response's tokens that are TARGET."""
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    return ((tokens == TARGET) * mask).sum(1) / np.maximum(mask.sum(1), 1)


@functools.lru_cache(maxsize=None)
def _policy():
    return jax.jit(lambda r: init_params(CFG, r))(jax.random.key(0))


def _run(name, mesh, iterations, reward=sevens):
    recipe = dict(RECIPES[name])
    rl = alg.RLConfig(**{"algorithm": name, "group_size": 4, **recipe})
    roles = pt.Roles(CFG, has_critic=False, has_reward_model=False)
    _, sh, fsh = pt.state_shardings(roles, TX, mesh)
    state = pt.init_state(_policy(), None, TX, HP.kl_coef, jax.random.key(2), sh)
    steps = pt.make_steps(roles, HP, TX, sh, fsh, mesh, eos_id=EOS, pad_id=PAD, alg=rl)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, CFG.vocab_size, size=(8, 4)).astype(np.int32)
    lengths = rng.integers(2, 5, size=8).astype(np.int32)
    frozen = {"ref": _policy()}
    history = []
    for _ in range(iterations):
        state, metrics, out = steps.iteration(state, frozen, prompts, lengths, reward_fn=reward)
        history.append(jax.device_get(metrics))
    return history, lambda reward_fn: steps.iteration(state, frozen, prompts, lengths, reward_fn=reward_fn)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_algorithm_raises_a_verifiable_reward_alike_on_one_and_eight_devices(name):
    one, more = _run(name, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]), ITERATIONS)
    start = one[0]["score"]  # ~1/64: the untrained policy's share of 7s
    end = np.mean([m["score"] for m in one[-4:]])
    assert end > max(4 * start, start + 0.08), (name, [round(float(m["score"]), 3) for m in one])
    for m in one:
        assert m["skipped"] == 0 and all(np.isfinite(v) for v in m.values()), name
    # A non-finite reward skips every update of the iteration and counts as a bad one.
    _, bad, _ = more(lambda prompts, lengths, out: np.full(out.mask.shape[0], np.nan, np.float32))
    assert int(bad["skipped"]) == HP.epochs * HP.mini_batches and int(bad["bad_streak"]) == 1, name
    eight, _ = _run(name, sharding.make_mesh((2, 2, 2)), 1)
    assert one[0]["score"] == pytest.approx(eight[0]["score"], abs=1e-6)
    assert one[0]["loss"] == pytest.approx(eight[0]["loss"], rel=1e-5, abs=1e-6), name


def test_python_reward_sees_decoded_text_and_comes_back_sharded(tmp_path):
    import os

    from lm.generation import SampleOutput
    from lm.tokenizer import Tokenizer
    from rl import stages

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tok = Tokenizer.train(os.path.join(root, "data/text/en.txt"), 320, str(tmp_path / "tok"), character_coverage=0.99)
    mesh = sharding.make_mesh((2, 2, 2))
    prompts = [tok.encode("the cat"), tok.encode("a dog ran")] * 2  # 4 rows: the mesh splits batches 4 ways
    answers = [tok.encode("sat down") + [tok.eos_id], tok.encode("far")] * 2
    width, n = 16, 16
    p = np.zeros((4, width), np.int32)
    r = np.zeros((4, n), np.int32)
    for i, (a, b) in enumerate(zip(prompts, answers)):
        p[i, :len(a)], r[i, :len(b)] = a, b
    out = SampleOutput(r, np.zeros((4, n), np.float32), (r > 0).astype(np.float32), np.array([len(b) for b in answers]))
    seen = {}

    def fn(prompts, completions, completion_ids):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids)
        return [len(c) for c in completions]

    scores = stages._text_rewards(fn, tok, mesh, sharding.RULES, p, np.array([len(a) for a in prompts]), out)
    assert seen["completions"] == ["sat down", "far"] * 2 and seen["prompts"][1] == "a dog ran"
    assert seen["ids"][0][-1] == tok.eos_id  # ids keep the end of turn; the text stops before it
    np.testing.assert_array_equal(np.asarray(scores), [8.0, 3.0] * 2)
    assert scores.sharding.is_equivalent_to(sharding.batch_sharding(mesh, 1, sharding.RULES), 1)
    with pytest.raises(ValueError, match="one float per completion"):
        stages._text_rewards(lambda **_: [1.0], tok, mesh, sharding.RULES, p, np.array([2, 3] * 2), out)
    with pytest.raises(ValueError, match="must be 'module:function'"):
        stages.load_reward_fn("experiments.qa_task")
    with pytest.raises(ValueError, match="cannot import nope"):
        stages.load_reward_fn("experiments.qa_task:nope")
    gold = stages.load_reward_fn("experiments.qa_task:gold_reward")
    assert gold(prompts=["What is the capital of France?"], completions=["I am not sure."]) == [0.0]

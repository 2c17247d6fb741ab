"""Reward model and DPO trained a few steps on a separable toy preference set; init, normalisation (the reward
stage's score statistics) and the reference log-probs map."""
import grain
import jax
import numpy as np
import optax
import pytest

from lm import presets, sharding
from lm.model import Transformer, init_params
from rl import dpo, reward, stages

CFG = presets.get("llama-tiny", vocab_size=32, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, max_len=16)
GOOD, B, K, T = 7, 16, 4, 12


def _toy_batch(rng):
    """K responses per prompt; the more GOOD tokens a response has the better it ranks (ties share a rank)."""
    tokens = rng.integers(10, CFG.vocab_size, size=(B, K, T)).astype(np.int32)
    lengths = rng.integers(10, T + 1, size=(B, K)).astype(np.int32)
    n_good = np.stack([rng.permutation(K) for _ in range(B)]) * 2  # distinct counts: no ties
    n_good[:, 0] = n_good[:, 1]  # but one tie per prompt
    for b in range(B):
        for k in range(K):
            slots = rng.choice(np.arange(3, lengths[b, k]), size=n_good[b, k], replace=False)
            tokens[b, k, slots] = GOOD
            tokens[b, k, lengths[b, k]:] = 0
    ranks = np.argsort(np.argsort(-n_good, axis=1, kind="stable"), axis=1).astype(np.int32)
    ranks[:, 1] = ranks[:, 0] = np.minimum(ranks[:, 0], ranks[:, 1])
    ranks[:2, 3] = -1  # two prompts with an absent response
    prompt_len = np.full((B, K), 3, np.int32)
    t = np.arange(T)
    targets = np.concatenate([tokens[..., 1:], np.zeros((B, K, 1), np.int32)], -1)
    loss_mask = ((t >= prompt_len[..., None] - 1) & (t < lengths[..., None] - 1)).astype(np.float32)
    return {"tokens": tokens, "last_index": lengths - 1, "ranks": ranks, "prompt_len": prompt_len,
            "inputs": tokens, "targets": targets, "loss_mask": loss_mask}


def _train(loss_fn, params, batches, lr=3e-3):
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch):
        (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)
        updates, opt = tx.update(g, opt)
        return optax.apply_updates(params, updates), opt, m

    for batch in batches:
        params, opt, m = step(params, opt, batch)
    return params


def test_reward_model_learns_separable_preferences():
    rng = np.random.default_rng(0)
    sft = jax.jit(lambda r: init_params(CFG, r))(jax.random.key(0))
    params = reward.init_from_sft(CFG, sft, jax.random.key(1))
    loss_fn = jax.jit(reward.reward_loss_fn(CFG))
    heldout = _toy_batch(np.random.default_rng(99))
    _, before = loss_fn(params, heldout, None)
    params = _train(reward.reward_loss_fn(CFG), params, [_toy_batch(rng) for _ in range(40)])
    loss, after = loss_fn(params, heldout, None)
    assert float(after["accuracy"]) > 0.9, (float(before["accuracy"]), float(after["accuracy"]))
    assert float(after["margin"]) > float(before["margin"])
    # Ties (slots 0, 1) and absent responses contribute no pairs: 6 - 1 per full prompt, 3 - 1 with one absent.
    assert int(after["pairs"]) == (B - 2) * 5 + 2 * 2


def test_init_from_sft_and_normalisation():
    sft = jax.jit(lambda r: init_params(CFG, r))(jax.random.key(0))
    score = jax.jit(lambda p, t, i: reward.score_responses(CFG, p, t, i))
    rm = reward.init_from_sft(CFG, sft, jax.random.key(1))
    assert "lm_head" not in rm and rm["score"]["kernel"].shape == (CFG.d_model, 1)
    np.testing.assert_array_equal(rm["layers"]["mlp"]["wi"]["kernel"], sft["layers"]["mlp"]["wi"]["kernel"])
    critic = reward.init_from_sft(CFG, sft, jax.random.key(1), head_init="zeros")
    batch = _toy_batch(np.random.default_rng(1))
    np.testing.assert_array_equal(score(critic, batch["tokens"], batch["last_index"]), 0.0)
    scores = score(rm, batch["tokens"], batch["last_index"])
    # The score is the head's value at each response's last token: check one against a plain forward.
    full = jax.jit(Transformer(CFG, head="scalar").apply)({"params": rm}, batch["tokens"][3])
    np.testing.assert_allclose(scores[3], full[np.arange(K), batch["last_index"][3]], atol=1e-6)
    # The reward stage's statistics over sharded batches: present responses only, every process stepping the
    # same number of times (rows with no response once a process's batches run out).
    batches = [_toy_batch(np.random.default_rng(i)) for i in (1, 2)]
    mesh = sharding.make_mesh((1, -1, 1))
    mean, std, n = stages.score_statistics(CFG, rm, batches, 3, mesh, sharding.RULES)
    present = np.concatenate([np.asarray(score(rm, b["tokens"], b["last_index"]))[b["ranks"] >= 0] for b in batches])
    assert n == present.size == 2 * B * K - 4
    np.testing.assert_allclose([mean, std], [present.mean(), present.std()], rtol=1e-5)
    normed = score(reward.normalize_head(rm, mean, std), batch["tokens"], batch["last_index"])
    assert abs(float(normed.mean())) < 0.2 and abs(float(normed.std()) - 1.0) < 0.2


def test_lm_regularised_reward_loss_adds_the_next_token_loss_of_the_best_responses():
    """RewardConfig.lm_coef: the ranking loss of the scalar model plus coef x the mean next-token loss over the
    responses ranked best (both of a tie for best), against a plain LM forward and a NumPy cross-entropy."""
    sft = jax.jit(lambda r: init_params(CFG, r))(jax.random.key(0))
    hp = reward.RewardConfig(lm_coef=0.3)
    params = reward.init_from_sft(CFG, sft, jax.random.key(1), head=hp.head)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], sft["lm_head"]["kernel"])
    batch = _toy_batch(np.random.default_rng(2))

    @jax.jit
    def losses_and_lm_logits(params, batch):  # one compilation for the three
        without = lambda name: {k: v for k, v in params.items() if k != name}  # noqa: E731
        plain, _ = reward.reward_loss_fn(CFG)(without("lm_head"), batch, None)
        logits = Transformer(CFG).apply({"params": without("score")}, batch["tokens"].reshape(B * K, T))
        return reward.reward_loss_fn(CFG, hp.lm_coef)(params, batch, None), plain, logits

    (loss, m), plain, logits = losses_and_lm_logits(params, batch)
    logits = np.asarray(logits, np.float64).reshape(B, K, T, -1)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"] * (batch["ranks"] == 0)[..., None]
    assert {1, 2} == set((batch["ranks"] == 0).sum(1))  # some prompts tie for best
    want_lm = (nll * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(m["lm_loss"]), want_lm, rtol=1e-5)
    np.testing.assert_allclose(float(m["rank_loss"]), float(plain), rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(plain) + 0.3 * want_lm, rtol=1e-5)
    assert reward.RewardConfig().head == "scalar"
    with pytest.raises(ValueError, match="lm_coef"):
        reward.RewardConfig(lm_coef=-0.1)


def test_dpo_steps_against_frozen_reference():
    rng = np.random.default_rng(0)
    ref = jax.jit(lambda r: init_params(CFG, r))(jax.random.key(0))
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    raw = [_toy_batch(rng) for _ in range(30)] + [_toy_batch(np.random.default_rng(99))]  # the last is held out
    batches = list(dpo.with_reference_logps(grain.MapDataset.source(raw).to_iter_dataset(), CFG, ref, mesh))
    batches, heldout = batches[:-1], batches[-1]
    want = jax.jit(lambda p, *a: dpo.sequence_logprobs(CFG, p, *a))(
        ref, *(batches[0][k] for k in ("inputs", "targets", "loss_mask")))
    np.testing.assert_allclose(batches[0]["ref_logps"], want, atol=1e-4)
    loss_fn = dpo.dpo_loss_fn(CFG, beta=0.5)
    loss0, m0 = jax.jit(loss_fn)(ref, heldout, None)
    assert abs(float(loss0) - np.log(2.0)) < 1e-5  # policy == reference: every logit is 0
    policy = _train(loss_fn, ref, batches, lr=1e-2)
    loss1, m1 = jax.jit(loss_fn)(policy, heldout, None)
    assert float(loss1) < float(loss0) - 0.05 and float(m1["reward_accuracy"]) > 0.75

"""PPO end to end on a tiny model: two iterations change the weights, NaN rewards are skipped and stop the
run, and a resumed run continues where it stopped (same data, samples and state). The sharded PPO iteration
on 8 fake devices equals the 1-device one in tests/test_families.py (with every other stage's step)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm import checkpoint, data, loop, presets, sharding
from lm.model import Transformer, init_params
from lm.tokenizer import Tokenizer
from rl import ppo, reward
from rl import ppo_step as pt

CFG = presets.get("llama-tiny", max_len=32)
HP = pt.PPOConfig(response_length=6, epochs=2, mini_batches=2, max_bad_iterations=2)
EOS, PAD = 2, 0


def _prompts(b=8):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, CFG.vocab_size, size=(b, 5)).astype(np.int32)
    lengths = rng.integers(2, 6, size=b).astype(np.int32)
    return tokens, lengths


# SGD keeps the update linear in the gradient, so layouts can be compared tightly (Adam divides by sqrt(v)
# and turns float noise in near-zero gradients into full-size steps).
TX = optax.sgd(0.5)


@functools.lru_cache(maxsize=None)
def _models():
    sft = jax.jit(lambda r: init_params(CFG, r))(jax.random.key(0))
    rm = reward.init_from_sft(CFG, sft, jax.random.key(1))
    return sft, rm


def _setup(mesh, donate=True):
    _, sh, fsh = pt.state_shardings(CFG, TX, mesh)
    sft, rm = _models()
    state = pt.init_state(sft, rm, TX, HP.kl_coef, jax.random.key(2), sh)
    steps = pt.make_steps(CFG, HP, TX, sh, fsh, mesh, eos_id=EOS, pad_id=PAD, donate=donate)
    return steps, state, {"ref": sft, "reward": rm}


@pytest.fixture(scope="module")
def single():
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return _setup(mesh, donate=False)


def test_two_iterations_change_weights_with_finite_metrics(single):
    steps, state, frozen = single
    prompts, lengths = _prompts()
    before = jax.device_get(state.params)
    for _ in range(2):
        state, metrics, out = steps.iteration(state, frozen, prompts, lengths)
        metrics = jax.device_get(metrics)
        for k, v in metrics.items():
            assert np.isfinite(v), k
        assert metrics["skipped"] == 0
    after = jax.device_get(state.params)
    for name in ("actor", "critic"):
        diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before[name], after[name])
        assert max(jax.tree.leaves(diffs)) > 1e-5, name
    assert int(state.step) == 2
    # The rollout keeps each prompt's own tokens and ends each response at EOS or the length limit.
    assert out.tokens.shape == (8, HP.response_length)
    # The reference stays frozen.
    np.testing.assert_array_equal(jax.tree.leaves(frozen["ref"])[0], jax.tree.leaves(_models()[0])[0])


def test_assemble_joins_prompt_and_response():
    prompts = jnp.array([[5, 6, 7], [8, 0, 0]], jnp.int32)
    lengths = jnp.array([3, 1], jnp.int32)
    out = pt.SampleOutput(jnp.array([[9, 2], [10, 0]]), jnp.zeros((2, 2)), jnp.array([[1.0, 1.0], [1.0, 0.0]]),
                          jnp.array([2, 1]))
    tokens, index = pt.assemble(prompts, lengths, out, PAD)
    np.testing.assert_array_equal(tokens, [[5, 6, 7, 9, 2], [8, 10, 0, 0, 0]])
    np.testing.assert_array_equal(index, [[2, 3], [0, 1]])


def test_non_finite_rewards_skip_update_and_stop(single):
    steps, state, frozen = single
    prompts, lengths = _prompts()
    bad = dict(frozen, reward=jax.tree.map(lambda x: x * jnp.nan, frozen["reward"]))
    before = jax.device_get(state.params)
    state, metrics, _ = steps.iteration(state, bad, prompts, lengths)
    assert int(metrics["skipped"]) == HP.epochs * HP.mini_batches and int(metrics["bad_streak"]) == 1
    loop.check_streak(metrics, HP.max_bad_iterations, 1)  # one bad iteration is tolerated
    after = jax.device_get(state.params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    state, metrics, _ = steps.iteration(state, bad, prompts, lengths)
    with pytest.raises(loop.TrainingStopped, match="step 2: the last 2 updates had a non-finite"):
        loop.check_streak(metrics, HP.max_bad_iterations, 2, "ppo.max_bad_iterations")
    # A good iteration resets the streak.
    state, metrics, _ = steps.iteration(state, frozen, prompts, lengths)
    assert int(metrics["bad_streak"]) == 0


def test_resume_from_checkpoint_continues_the_run(single, tmp_path):
    steps, _, frozen = single
    abstract, sh, _ = pt.state_shardings(CFG, TX, steps.mesh)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, CFG.vocab_size, size=rng.integers(2, 6)).astype(np.int32) for _ in range(20)]
    prompt_data = data.prompt_dataset(prompts, width=5, batch_size=8, seed=0, pad_id=PAD)
    it = iter(prompt_data)
    state = pt.init_state(*_models(), TX, HP.kl_coef, jax.random.key(2), sh)
    b = next(it)
    state, _, _ = steps.iteration(state, frozen, b["tokens"], b["lengths"])
    # As an adaptive controller would have moved it (same placement, so the compiled step is reused).
    state = state.replace(kl_coef=jax.device_put(jnp.float32(0.0123), state.kl_coef.sharding))
    ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=1, async_save=False)
    assert ckpt.save(1, state, it, {"model": CFG.to_dict()})  # the KL coefficient is state, saved as such
    ckpt.wait()
    b = next(it)
    want, want_m, want_out = steps.iteration(state, frozen, b["tokens"], b["lengths"])

    it2 = iter(prompt_data)
    restored = ckpt.restore(abstract, data_iter=it2)
    ckpt.close()
    assert float(restored.kl_coef) == np.float32(0.0123) and int(restored.step) == 1
    b2 = next(it2)
    np.testing.assert_array_equal(b2["tokens"], b["tokens"])
    np.testing.assert_array_equal(jax.device_get(restored.rng), jax.device_get(state.rng))
    got, got_m, got_out = steps.iteration(restored, frozen, b2["tokens"], b2["lengths"])
    # Same samples; the update agrees to float rounding (XLA:CPU's multi-threaded kernels may differ in the
    # last bit between two runs of one program, jax-ml/jax#39741, so exact equality would be flaky).
    np.testing.assert_array_equal(got_out.tokens, want_out.tokens)
    for a, c in zip(jax.tree.leaves(jax.device_get(want)), jax.tree.leaves(jax.device_get(got))):
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_m["loss"], want_m["loss"], rtol=1e-6)


def test_read_prompts_names_bad_rows(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("what is the capital of france? the capital of france is paris.\n" * 50)
    tok = Tokenizer.train([str(text)], 300, str(tmp_path / "tok"))
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "what is the capital?"}\n\n{"prompt": "paris"}\n')
    ids = data.read_prompts(str(good), tok, 32)
    assert len(ids) == 2 and ids[0][-1] == tok.assistant_id
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: row does not match the 'prompt' schema .*missing key 'prompt'"):
        data.read_prompts(str(bad), tok, 32)
    with pytest.raises(ValueError, match=r"p.jsonl:1: .* more than data.prompt_len=3"):
        data.read_prompts(str(good), tok, 3)


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])  # separate and tied output embeddings
def test_policy_logprobs_match_full_model_forward(preset):
    cfg = presets.get(preset, n_layers=1, max_len=16)
    params = jax.jit(lambda r: init_params(cfg, r))(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 12), 3, cfg.vocab_size)
    index = jnp.array([[2, 3, 4], [5, 6, 7], [8, 9, 10]])
    targets = jnp.take_along_axis(tokens, index + 1, axis=1)

    @jax.jit
    def both(params):
        ours, _ = pt._policy_outputs(cfg, params, tokens, index, targets, None, 0.7)
        logits = Transformer(cfg).apply({"params": params}, tokens)
        return ours, ppo.token_logprobs(jnp.take_along_axis(logits, index[..., None], axis=1), targets, 0.7)

    ours, want = both(params)
    np.testing.assert_allclose(ours, want, atol=1e-5)

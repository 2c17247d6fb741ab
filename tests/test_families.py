"""Every stage's step runs on the tiny family presets and gives the same losses and updated weights on one device
and on an 8-device (2, 2, 2) mesh: pretraining/SFT (the LM loss under a response mask), the K-wise reward
model, DPO against a frozen reference, and a PPO iteration (KV-cache rollout, then learn).

The suite runs the whole check on Gemma3-tiny (with one local and one global layer), the family with the most of
the newer `ModelConfig` fields (~60 s on 2 cores), and the LM step (the sharded forward and backward every stage builds on) on the families whose
parameters or layer graph Gemma3 does not have; `python bench/families.py --stages` runs the whole check on all
ten (~45 s each)."""
import functools

import jax
import numpy as np
import optax
import pytest

from lm import losses, presets, sharding, train_step
from lm.model import Transformer, abstract_params, boxed_params
from rl import dpo, reward
from rl import ppo_step as pt

FAMILIES = ["llama3-tiny", "qwen2-tiny", "qwen3-tiny", "mistral-tiny", "gemma2-tiny", "gemma3-tiny", "phi3-tiny",
            "neox-tiny", "opt-tiny", "chatglm2-tiny"]
# Gemma3: (1 + w) norms before and after each sub-layer, embedding scale, q/k norms, local and global windows
# with their own RoPE bases, the query scale.
IN_SUITE = ["gemma3-tiny"]
# A position table with an offset (OPT), the parallel residual with partial rotary (NeoX), interleaved half-head
# RoPE with 2 K/V groups split over the tensor axis (ChatGLM2).
LM_STEP_IN_SUITE = ["opt-tiny", "neox-tiny", "chatglm2-tiny"]
B, K, T = 8, 2, 24  # T is longer than the tiny presets' 16-token sliding windows
TX = optax.sgd(0.5)  # linear in the gradient, so layouts compare tightly
HP = pt.PPOConfig(response_length=6, epochs=1, mini_batches=2)


def _cfg(name, **overrides):
    """The preset (with `overrides`), small and scanned (compiles once per layer kind), with one period of its
    window pattern."""
    cfg = presets.get(name, **overrides)
    layers = max(2, len(cfg.window_pattern)) if cfg.sliding_window else 2
    return cfg.replace(vocab_size=64, max_len=48, n_layers=layers, scan_unroll=1)


def _params(cfg, head, seed=0):
    """Deterministic NumPy parameters (ones plus noise for norm scales)."""
    rs = np.random.RandomState(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, a: ((1.0 - cfg.norm_scale_offset if "scale" in jax.tree_util.keystr(p) else 0.0)
                      + 0.1 * rs.randn(*a.shape)).astype(a.dtype), abstract_params(cfg, head))


def _batches(cfg):
    rs = np.random.RandomState(1)
    tokens = rs.randint(3, cfg.vocab_size, (B, K, T)).astype(np.int32)
    targets = np.concatenate([tokens[..., 1:], np.zeros((B, K, 1), np.int32)], -1)
    prompt_len = rs.randint(2, 8, (B, K)).astype(np.int32)
    mask = (np.arange(T) >= prompt_len[..., None] - 1).astype(np.float32)
    ranks = np.tile(np.arange(K, dtype=np.int32), (B, 1))
    pref = {"inputs": tokens, "targets": targets, "loss_mask": mask, "prompt_len": prompt_len, "ranks": ranks,
            "tokens": tokens, "last_index": np.full((B, K), T - 1, np.int32)}
    lm_batch = {"inputs": tokens[:, 0], "targets": targets[:, 0], "loss_mask": mask[:, 0]}
    return lm_batch, pref


def _step(cfg, loss_fn, head, mesh, batch):
    build = functools.partial(boxed_params, cfg, head=head)
    state, shardings = train_step.init_state(build, TX, jax.random.PRNGKey(0), mesh, params=_params(cfg, head))
    step = train_step.make_train_step(loss_fn, TX, shardings, mesh, donate=False)
    new, metrics = step(state, sharding.global_batch(batch, mesh))
    return float(metrics["loss"]), jax.device_get(new.params)


def _ppo(cfg, mesh, prompts, lengths):
    _, sh, fsh = pt.state_shardings(cfg, TX, mesh)
    sft, rm = _params(cfg, "lm"), _params(cfg, "scalar", seed=1)
    state = pt.init_state(sft, rm, TX, HP.kl_coef, jax.random.key(2), sh)
    steps = pt.make_steps(cfg, HP, TX, sh, fsh, mesh, eos_id=2, pad_id=0, donate=False)
    leaf = state.params["actor"]["layers"]["mlp"]["wi"]["kernel"]
    assert len(leaf.sharding.device_set) == mesh.size and (mesh.size == 1 or not leaf.sharding.is_fully_replicated)
    frozen = {"ref": sft, "reward": rm}
    out = steps.rollout(state.params, frozen, prompts, lengths, jax.random.key(7))
    new, metrics = steps.learn(state, frozen, prompts, lengths, jax.device_get(out))
    return jax.device_get(out), {k: float(metrics[k]) for k in ("loss", "kl", "score")}, jax.device_get(new.params)


def _close_trees(a, b, what):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=2e-5, err_msg=f"{what} {jax.tree_util.keystr(path)}")


def check_family(name, **overrides):
    """Run every stage's step on preset `name` (with `overrides`) on one device and on the 8-device mesh and
    compare them."""
    cfg = _cfg(name, **overrides)
    lm_batch, pref = _batches(cfg)
    ref_logps = np.asarray(jax.jit(lambda p, *a: dpo.sequence_logprobs(cfg, p, *a))(
        _params(cfg, "lm", seed=3), pref["inputs"], pref["targets"], pref["loss_mask"]))
    stage_steps = {
        "lm": (losses.lm_loss_fn(Transformer(cfg)), "lm", lm_batch),
        "reward": (reward.reward_loss_fn(cfg), "scalar", pref),
        "dpo": (dpo.dpo_loss_fn(cfg, beta=0.5), "lm", dict(pref, ref_logps=ref_logps)),
    }
    rs = np.random.RandomState(2)
    prompts = rs.randint(3, cfg.vocab_size, (B, 20)).astype(np.int32)  # rollouts run past the window
    lengths = rs.randint(17, 21, B).astype(np.int32)
    meshes = [sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]), sharding.make_mesh((2, 2, 2))]
    results = [{stage: _step(cfg, fn, head, mesh, batch) for stage, (fn, head, batch) in stage_steps.items()}
               | {"ppo": _ppo(cfg, mesh, prompts, lengths)} for mesh in meshes]
    one, eight = results
    for stage in stage_steps:
        assert np.isfinite(one[stage][0]), (stage, one[stage][0])
        np.testing.assert_allclose(eight[stage][0], one[stage][0], rtol=1e-5, err_msg=stage)
        _close_trees(one[stage][1], eight[stage][1], stage)
    (out1, m1, p1), (out8, m8, p8) = one["ppo"], eight["ppo"]
    np.testing.assert_array_equal(out1.tokens, out8.tokens)
    np.testing.assert_allclose(out1.logprobs, out8.logprobs, atol=1e-5)
    for k in m1:
        assert np.isfinite(m1[k]), (k, m1[k])
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    _close_trees(p1, p8, "ppo")


@pytest.mark.parametrize("name", IN_SUITE)
def test_every_stage_same_on_one_device_and_a_mesh(name):
    check_family(name, window_pattern="LG")  # one local and one global layer: Gemma3's period in 2 layers, not 6


@pytest.mark.parametrize("name", LM_STEP_IN_SUITE)
def test_lm_step_same_on_one_device_and_a_mesh(name):
    cfg = _cfg(name)
    lm_batch, _ = _batches(cfg)
    meshes = [sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]), sharding.make_mesh((2, 2, 2))]
    (loss1, params1), (loss8, params8) = (_step(cfg, losses.lm_loss_fn(Transformer(cfg)), "lm", mesh, lm_batch)
                                          for mesh in meshes)
    assert np.isfinite(loss1)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    _close_trees(params1, params8, "lm")

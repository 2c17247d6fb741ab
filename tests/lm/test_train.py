"""Losses, optimiser, the generic train step (accumulation, NaN skipping) and the fit loop."""
import json
import os

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common, pretrain
from lm import loop, losses, optim, presets, sharding, train_step
from lm.logging_utils import read_metrics
from lm.model import Transformer

CFG = presets.get("llama-tiny", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
MODEL = Transformer(CFG)


def build(rng):
    return MODEL.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]


def numpy_params(abstract):
    """Deterministic parameters without compiling an RNG init: ones for norm scales, N(0, 0.02) otherwise."""
    rs = np.random.RandomState(0)
    return jax.tree_util.tree_map_with_path(
        lambda p, a: np.ones(a.shape, a.dtype) if "scale" in jax.tree_util.keystr(p)
        else (0.02 * rs.randn(*a.shape)).astype(a.dtype), abstract)


def lm_batch(rs, b=16, t=16):
    inputs = rs.randint(0, CFG.vocab_size, (b, t)).astype(np.int32)
    # Token counts differ a lot between rows, so a plain mean of micro-batch means would be wrong.
    mask = (rs.rand(b, t) < rs.rand(b, 1)).astype(np.float32)
    return {"inputs": inputs, "targets": (inputs * 3 + 1) % CFG.vocab_size, "loss_mask": mask}


@pytest.fixture(scope="module")
def setup():
    mesh = sharding.make_mesh((2, 2, 2))
    # SGD with momentum: parameters then differ exactly as much as gradients do (Adam would blow tiny
    # rounding differences of near-zero gradients up to lr-sized steps), and there is state to protect.
    lr = optax.linear_schedule(0.5, 0.1, 10)
    tx = optax.sgd(lr, momentum=0.9)
    abstract, _ = train_step.state_shardings(build, tx, mesh)
    params = numpy_params(abstract.params)
    steps = {k: train_step.init_state(build, tx, jax.random.PRNGKey(0), mesh, params=params)[1] for k in (1, 2)}
    steps = {k: train_step.make_train_step(losses.lm_loss_fn(MODEL), tx, sh, mesh, micro_batches=k, lr_schedule=lr)
             for k, sh in steps.items()}
    fresh = lambda: train_step.init_state(build, tx, jax.random.PRNGKey(0), mesh, params=params)[0]  # noqa: E731
    return mesh, steps, fresh


def test_lm_loss_matches_numpy_and_ignores_masked_tokens():
    rs = np.random.RandomState(0)
    logits = rs.randn(2, 5, 7).astype(np.float32) * 3
    targets = rs.randint(0, 7, (2, 5)).astype(np.int32)
    mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    loss, m = losses.lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(loss, (nll * mask).sum() / mask.sum(), rtol=1e-6)
    acc = ((logits.argmax(-1) == targets) * mask).sum() / mask.sum()
    np.testing.assert_allclose(m["accuracy"], acc, rtol=1e-6)
    assert m["weight"] == mask.sum()
    # SFT: prompt positions (mask 0) do not matter: other targets/logits there give the same loss and
    # no gradient reaches them.
    targets2, logits2 = targets.copy(), logits.copy()
    targets2[mask == 0] = (targets2[mask == 0] + 3) % 7
    logits2[mask == 0] += 5.0 * rs.randn(int((mask == 0).sum()), 7).astype(np.float32)
    np.testing.assert_allclose(losses.lm_loss(logits2, targets2, mask)[0], loss, rtol=1e-6)
    grad = jax.grad(lambda lg: losses.lm_loss(lg, targets, mask)[0])(jnp.asarray(logits))
    assert np.all(np.asarray(grad)[mask == 0] == 0) and np.abs(np.asarray(grad)[mask == 1]).sum() > 0
    # No counted token at all: a zero loss, not a NaN.
    assert losses.lm_loss(logits, targets, np.zeros_like(mask))[0] == 0.0


def test_sft_loss_fn_ignores_prompt_tokens():
    params = numpy_params(nn.unbox(jax.eval_shape(build, jax.random.PRNGKey(0))))
    rs = np.random.RandomState(1)
    batch = lm_batch(rs, b=2, t=8)
    batch["loss_mask"] = np.array([[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0, 0]], np.float32)
    other = dict(batch, targets=np.where(batch["loss_mask"] == 0, 5, batch["targets"]).astype(np.int32))
    loss_fn = jax.jit(losses.lm_loss_fn(MODEL))
    np.testing.assert_allclose(loss_fn(params, other, None)[0], loss_fn(params, batch, None)[0], rtol=1e-6)


def test_decay_mask_and_schedule():
    params = jax.eval_shape(build, jax.random.PRNGKey(0))
    mask = optim.decay_mask(params, ("norms", "biases", "embeddings"))
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["['embed']['embedding'].value"] is False and flat["['final_norm']['scale'].value"] is False
    assert flat["['layers']['attn_norm']['scale'].value"] is False
    assert flat["['layers']['mlp']['wi']['kernel'].value"] is True and flat["['lm_head']['kernel'].value"] is True
    assert optim.decay_mask(params, ("norms",))["embed"]["embedding"].value is True
    with pytest.raises(ValueError, match="unknown kind.*'bias'"):
        optim.decay_mask(params, ("bias",))
    sched = optim.schedule(common.optim(1.0, 10), 110)
    assert float(sched(0)) == 0.0 and abs(float(sched(5)) - 0.5) < 1e-6 and abs(float(sched(10)) - 1.0) < 1e-6
    assert abs(float(sched(110)) - 0.1) < 1e-6 and float(sched(60)) < float(sched(30))


def test_grad_accumulation_equals_the_whole_batch(setup):
    mesh, steps, fresh = setup
    rs = np.random.RandomState(2)
    data = [lm_batch(rs) for _ in range(3)]
    results = {}
    for k, step in steps.items():
        state, out = fresh(), []
        for b in data:
            state, m = step(state, sharding.global_batch(b, mesh))
            out.append(m)
        results[k] = (state, jax.device_get(out))
    (s1, m1), (s2, m2) = results[1], results[2]
    for a, b in zip(m1, m2):
        for key in ("loss", "accuracy", "weight", "grad_norm", "lr"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1.params, s2.params)
    assert not np.allclose(s1.params["lm_head"]["kernel"], fresh().params["lm_head"]["kernel"])


def test_non_finite_update_is_skipped_and_counted(setup):
    mesh, steps, fresh = setup
    step = steps[1]
    rs = np.random.RandomState(3)
    good = sharding.global_batch(lm_batch(rs), mesh)
    bad_rows = lm_batch(rs)
    bad_rows["loss_mask"][0, 0] = np.nan
    bad = sharding.global_batch(bad_rows, mesh)
    state, _ = step(fresh(), good)
    before = jax.device_get(state)
    state, m = step(state, bad)
    assert m["skipped"] == 1 and m["skipped_total"] == 1 and m["bad_streak"] == 1 and not np.isfinite(m["loss"])
    after = jax.device_get(state)
    jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
    jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)  # momentum, schedule count
    assert after.step == 2
    state, m = step(state, bad)
    assert m["bad_streak"] == 2 and m["skipped_total"] == 2
    state, m = step(state, good)
    assert m["skipped"] == 0 and m["bad_streak"] == 0 and m["skipped_total"] == 2 and state.step == 4
    assert not np.array_equal(state.params["lm_head"]["kernel"], before.params["lm_head"]["kernel"])


def test_fit_logs_evaluates_checkpoints_and_stops_on_repeated_nan(tmp_path):
    config = pretrain.get_config("tiny")
    config.train.update(steps=8, batch_size=8, log_every=1, eval_every=3, eval_batches=2, max_bad_steps=2)
    config.checkpoint.every_steps = 3
    rs = np.random.RandomState(4)
    rows = [lm_batch(rs, b=8) for _ in range(8)]
    for b in rows[4:6]:  # steps 5 and 6 see a NaN
        b["loss_mask"][0, 0] = np.nan
    workdir = str(tmp_path)
    with pytest.raises(loop.TrainingStopped, match=r"step 6: the last 2 updates had a non-finite loss"):
        loop.fit(config, workdir, loss_fn=losses.lm_loss_fn(MODEL), build_params=build,
                    train_data=grain.MapDataset.source(rows).to_iter_dataset(),
                    eval_data=[lm_batch(np.random.RandomState(5), b=8) for _ in range(2)],
                    init_params=numpy_params)
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in records[:4])
    assert records[4]["skipped"] == 1 and records[4]["loss"] == "nan"
    assert records[3]["loss"] < records[0]["loss"]
    ev = records[2]
    np.testing.assert_allclose(ev["eval_perplexity"], np.exp(ev["eval_loss"]), rtol=1e-5)
    assert "eval_loss" not in records[1]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
    json.dumps(records)  # every record is plain JSON

"""Training adapters on a frozen base with the generic train step: the state holds the trainable leaves only, the
base is an input that stays bit-identical, and a step on an 8-device mesh computes what one device does."""
import functools

import jax
import numpy as np
import optax
import pytest

from lm import losses, peft, presets, sharding, train_step
from lm.model import Transformer, init_params

BASE = presets.get("llama-tiny", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def _batch(b=8, t=16):
    rs = np.random.RandomState(0)
    inputs = rs.randint(0, BASE.vocab_size, (b, t)).astype(np.int32)
    return {"inputs": inputs, "targets": (inputs * 3 + 1) % BASE.vocab_size,
            "loss_mask": (rs.rand(b, t) < 0.8).astype(np.float32)}


def _train(cfg, mesh, steps=3):
    """`steps` SGD steps of the adapters of `cfg` on a frozen random base; (losses, state, base before, base after)."""
    float_base = init_params(BASE, jax.random.key(0))
    frozen = peft.frozen_base(cfg, lambda abstract: jax.device_put(float_base, jax.tree.map(lambda a: a.sharding,
                                                                                              abstract)),
                              "lm", mesh)
    before = jax.device_get(frozen.params)
    tx = optax.sgd(0.5)
    build = functools.partial(peft.boxed_trainable, cfg)
    state, sh = train_step.init_state(build, tx, jax.random.PRNGKey(1), mesh)
    step = train_step.make_train_step(losses.lm_loss_fn(Transformer(cfg)), tx, sh, mesh,
                                      frozen_shardings=frozen.shardings)
    losses_ = []
    for _ in range(steps):
        state, metrics = step(state, sharding.global_batch(_batch(), mesh, sharding.RULES), frozen.params)
        losses_.append(float(metrics["loss"]))
    return losses_, jax.device_get(state), before, jax.device_get(frozen.params)


@pytest.mark.parametrize("method,fields", [("qlora", dict(quant="nf4", quant_block=16)), ("prefix", {})])
def test_adapters_train_on_a_base_that_never_changes(method, fields):
    cfg = peft.adapt(BASE, peft.PeftConfig(method=method, rank=4, dropout=0.0, virtual_tokens=3, **fields))
    mesh = sharding.make_mesh((1, 8, 1))
    losses_, state, before, after = _train(cfg, mesh)
    assert losses_[-1] < losses_[0]
    jax.tree.map(np.testing.assert_array_equal, before, after)  # bit-identical, never donated or written
    names = {jax.tree_util.keystr(p).split("'")[-2] for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert names <= set(peft.ADAPTER_LEAVES) and names  # no base leaf is trained


def test_lora_step_on_8_devices_equals_1_device():
    cfg = peft.adapt(BASE, peft.PeftConfig(method="lora", rank=4, dropout=0.0, targets="q,k,v,o,wi,wg,wo,lm_head"))
    one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    eight = sharding.make_mesh((2, 2, 2))
    (l1, s1, _, _), (l8, s8, _, _) = _train(cfg, one), _train(cfg, eight)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), s8.params, s1.params)
    # Adam on the adapters: moments exist for exactly the trainable leaves.
    tx = optax.adamw(1e-3)
    abstract, _ = train_step.state_shardings(functools.partial(peft.boxed_trainable, cfg), tx, eight)
    mu = abstract.opt_state[0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(abstract.params)
    base, trainable = peft.split(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    assert peft.count(mu) == peft.count(trainable) and "embed" not in mu

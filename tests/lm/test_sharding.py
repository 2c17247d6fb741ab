"""Mesh construction, the logical-axis rules, and sharded training equal to single-device training."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from lm import losses, optim, presets, sharding, train_step
from lm.model import Transformer

CFG = presets.get("llama-tiny", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def build(cfg):
    return lambda r: Transformer(cfg).init(r, jnp.zeros((1, 8), jnp.int32))["params"]


def batches(n=5, b=8, t=16, seed=0):
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        inputs = rs.randint(0, CFG.vocab_size, (b, t)).astype(np.int32)
        out.append({"inputs": inputs, "targets": (inputs * 3 + 1) % CFG.vocab_size,  # learnable
                    "loss_mask": (rs.rand(b, t) > 0.3).astype(np.float32)})
    return out


def numpy_params(abstract):
    """Deterministic parameters without compiling an RNG init: ones for norm scales, N(0, 0.02) otherwise."""
    rs = np.random.RandomState(0)
    return jax.tree_util.tree_map_with_path(
        lambda p, a: np.ones(a.shape, a.dtype) if "scale" in jax.tree_util.keystr(p)
        else (0.02 * rs.randn(*a.shape)).astype(a.dtype), abstract)


def run_steps(mesh, data):
    tx, lr = optim.make_optimizer(common.optim(1e-2, 1), 10)
    abstract, _ = train_step.state_shardings(build(CFG), tx, mesh)
    state, shardings = train_step.init_state(build(CFG), tx, jax.random.PRNGKey(0), mesh,
                                        params=numpy_params(abstract.params))
    step = train_step.make_train_step(losses.lm_loss_fn(Transformer(CFG)), tx, shardings, mesh, lr_schedule=lr)
    out = []
    for b in data:
        state, m = step(state, sharding.global_batch(b, mesh))
        out.append(float(m["loss"]))
    return np.array(out), state


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes():
    assert dict(sharding.make_mesh((2, -1, 1)).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match=r"needs 12 devices, but 8"):
        sharding.make_mesh((2, 3, 2))
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh((-1, -1, 2))
    with pytest.raises(ValueError, match="not divisible by 3"):
        sharding.make_mesh((3, -1, 1))
    with pytest.raises(ValueError, match="differ in length"):
        sharding.make_mesh((8,), ("data", "fsdp"))


def test_rules_from_config_and_override():
    rules = sharding.rules_from_config(common.mesh().rules)
    assert dict(rules) == dict(sharding.RULES)
    mesh = sharding.make_mesh((1, 8, 1))
    tx, _ = optim.make_optimizer(common.optim(1e-3, 1), 10)
    no_fsdp = sharding.rules_from_config({**common.mesh().rules.to_dict(), "embed": ""})
    _, sh = train_step.state_shardings(build(CFG), tx, mesh, no_fsdp)
    assert sh.params["layers"]["mlp"]["wi"]["kernel"].spec == P(None, None, "tensor")
    _, sh = train_step.state_shardings(build(CFG), tx, mesh, rules)
    assert sh.params["layers"]["mlp"]["wi"]["kernel"].spec == P(None, "fsdp", "tensor")


def test_indivisible_dims_fall_back_to_replication_with_a_named_warning(caplog):
    mesh = sharding.make_mesh((1, 2, 4))  # 2 kv heads cannot split 4 ways; 4 query heads can
    tx, _ = optim.make_optimizer(common.optim(1e-3, 1), 10)
    with caplog.at_level(logging.WARNING, logger="lm.sharding"):
        _, sh = train_step.state_shardings(build(CFG), tx, mesh)
    assert sh.params["layers"]["attn"]["k"]["kernel"].spec == P(None, "fsdp", None, None)
    assert sh.params["layers"]["attn"]["q"]["kernel"].spec == P(None, "fsdp", "tensor", None)
    assert any("['attn']['k']['kernel']" in r.message and "(2, 32, 2, 8)" in r.message for r in caplog.records)


def test_batch_that_cannot_be_split_is_a_clear_error():
    mesh = sharding.make_mesh((2, 4, 1))
    sharding.check_batch(16, 2, mesh)
    with pytest.raises(ValueError, match=r"batch_size=12 must split into train.micro_batches=1 .* "
                                         r"data-parallel size 8"):
        sharding.check_batch(12, 1, mesh)


def test_same_losses_on_one_device_and_sharded_meshes():
    data = batches()
    ref, ref_state = run_steps(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]), data)
    assert np.isfinite(ref).all() and ref[-1] < ref[0]
    for shape in [(2, 2, 2), (1, 8, 1), (8, 1, 1)]:
        mesh = sharding.make_mesh(shape)
        got, state = run_steps(mesh, data)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=str(shape))
        # Parameters really are split: each device holds 1/n of a weight along its named mesh axes.
        wi = state.params["layers"]["mlp"]["wi"]["kernel"]  # [layers, embed, mlp] -> (None, fsdp, tensor)
        assert wi.sharding.spec == P(None, "fsdp", "tensor")
        fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
        assert wi.addressable_shards[0].data.shape == (2, 32 // fsdp, 64 // tensor)
        mu = state.opt_state[1][0].mu["layers"]["mlp"]["wi"]["kernel"]  # Adam moments sharded alike
        assert mu.sharding.spec == wi.sharding.spec
        np.testing.assert_allclose(np.asarray(wi), np.asarray(ref_state.params["layers"]["mlp"]["wi"]["kernel"]),
                                   atol=1e-5)

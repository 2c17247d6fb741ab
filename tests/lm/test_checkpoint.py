"""Orbax checkpoints: exact restore onto other meshes, clear shape errors, and SIGTERM / kill -9 / resume
bit-identity of a launcher."""
import os
import random
import signal

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from lm import checkpoint, optim, presets, sharding, train_step
from lm.logging_utils import read_metrics
from lm.model import Transformer
from launchers import cache_env, finish, launch, signal_after

CFG = presets.get("llama-tiny", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def builder(cfg):
    return lambda r: Transformer(cfg).init(r, jnp.zeros((1, 8), jnp.int32))["params"]


def make_state(cfg, mesh, seed=0):
    tx, _ = optim.make_optimizer(common.optim(1e-3, 1), 10)
    abstract, _ = train_step.state_shardings(builder(cfg), tx, mesh)
    rs = np.random.RandomState(seed)
    params = jax.tree.map(lambda a: rs.randn(*a.shape).astype(a.dtype), abstract.params)
    state, _ = train_step.init_state(builder(cfg), tx, jax.random.PRNGKey(seed), mesh, params=params)
    # Non-trivial optimiser moments and counters, so their restore is checked too.
    state = state.replace(step=jnp.int32(7), skipped=jnp.int32(2),
                          opt_state=jax.tree.map(lambda x: x + (0.5 if x.dtype == jnp.float32 else 3), state.opt_state))
    return state, tx


def test_restore_onto_another_mesh_is_exact(tmp_path):
    state, tx = make_state(CFG, sharding.make_mesh((1, 8, 1)))
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    assert ckpt.save(7, state, meta={"model": CFG.to_dict()}, force=True)
    ckpt.close()
    assert checkpoint.load_meta(str(tmp_path))["model"] == CFG.to_dict()
    for shape in [(2, 2, 2), (1, 1, 1)]:
        mesh = sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
        abstract, shardings = train_step.state_shardings(builder(CFG), tx, mesh)
        restored = checkpoint.Checkpointer(str(tmp_path)).restore(abstract)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
        jax.tree.map(lambda x, s: x.sharding == s or pytest.fail(f"{x.sharding} != {s}"), restored, shardings)
        q = restored.params["layers"]["attn"]["q"]["kernel"]
        assert q.sharding.mesh.shape == mesh.shape
        assert q.addressable_shards[0].data.shape == (2, 32 // mesh.shape["fsdp"], 4 // mesh.shape["tensor"], 8)


def test_checkpoint_of_another_model_shape_is_a_clear_error(tmp_path):
    state, tx = make_state(CFG, sharding.make_mesh((1, 8, 1)))
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state, force=True)
    ckpt.close()
    wider = CFG.replace(d_model=48)
    abstract, _ = train_step.state_shardings(builder(wider), tx, sharding.make_mesh((1, 8, 1)))
    with pytest.raises(ValueError, match=r"params\['embed'\]\['embedding'\]: checkpoint has shape \(128, 32\), "
                                         r"the model expects \(128, 48\)"):
        checkpoint.Checkpointer(str(tmp_path)).restore(abstract)
    with pytest.raises(ValueError, match=r"(?s)does not fit this model.*"
                                         r"params\['final_norm'\]\['scale'\]: checkpoint has shape \(32,\)"):
        checkpoint.load_params(str(tmp_path), abstract.params)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        checkpoint.load_params(str(tmp_path / "missing"), abstract.params)


def test_keeps_the_last_k_and_restores_the_data_position(tmp_path):
    state, tx = make_state(CFG, sharding.make_mesh((1, 8, 1)))
    ds = grain.MapDataset.source(list(range(50))).shuffle(seed=3).batch(4).to_iter_dataset()
    it = iter(ds)
    ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=2, max_to_keep=2)
    for step in range(1, 8):
        next(it)
        ckpt.save(step, state.replace(step=jnp.int32(step)), it)
    ckpt.close()
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [4, 6]
    expected = [next(it).tolist() for _ in range(3)]  # the batches after step 7
    it2 = iter(ds)
    abstract, _ = train_step.state_shardings(builder(CFG), tx, sharding.make_mesh((1, 8, 1)))
    restored = checkpoint.Checkpointer(str(tmp_path)).restore(abstract, data_iter=it2)
    assert int(restored.step) == 6
    next(it2)  # step 7's batch
    assert [next(it2).tolist() for _ in range(3)] == expected


def _final_params(workdir):
    meta = checkpoint.load_meta(os.path.join(workdir, "checkpoints"))
    cfg = presets.get("llama-tiny").from_dict(meta["model"])
    abstract = nn.unbox(jax.eval_shape(builder(cfg), jax.random.PRNGKey(0)))
    return jax.device_get(checkpoint.load_params(os.path.join(workdir, "checkpoints"), abstract)), meta


def test_sigterm_then_kill_at_random_points_and_reruns_are_bit_identical_then_sft_starts_from_it(tmp_path):
    env = cache_env(tmp_path)
    steps = 24
    args = ["--config=configs/pretrain.py:tiny", f"--config.train.steps={steps}", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.checkpoint.every_steps=3", "--config.data.seq_len=32",
            "--config.model.overrides.n_layers=1", f"--config.data.cache_dir={tmp_path / 'data'}"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    finish(launch("experiments.pretrain", straight, *args, env=env))

    # Preemption: SIGTERM saves the step the run is at (whatever the cadence) and exits 143 without a traceback.
    term_after = random.randint(2, steps // 2)
    assert signal_after(launch("experiments.pretrain", killed, *args, env=env), killed, term_after,
                        signal.SIGTERM) == 143
    saved = checkpoint.latest_step(os.path.join(killed, "checkpoints"))
    logged = [r["step"] for r in read_metrics(os.path.join(killed, "metrics.jsonl"))]
    assert term_after <= saved < steps and logged == list(range(1, saved + 1)), (term_after, saved, logged)
    with open(killed + ".log") as f:
        assert f"preempted: saved step {saved}" in f.read()
    # Then a crash: kill -9 after a later step loses at most the steps since the last save.
    kill_after = random.randint(saved + 1, steps - 4)
    signal_after(launch("experiments.pretrain", killed, *args, env=env), killed, kill_after, signal.SIGKILL)
    assert checkpoint.latest_step(os.path.join(killed, "checkpoints")) < steps
    finish(launch("experiments.pretrain", killed, *args, env=env))  # the same command again

    where = f"SIGTERM after step {term_after}, kill -9 after step {kill_after}"
    a, b = read_metrics(os.path.join(straight, "metrics.jsonl")), read_metrics(os.path.join(killed, "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(1, steps + 1)), where
    assert [r["loss"] for r in a] == [r["loss"] for r in b], where
    (pa, meta), (pb, _) = _final_params(straight), _final_params(killed)
    jax.tree.map(np.testing.assert_array_equal, pa, pb)
    assert meta["model"]["n_layers"] == 1 and meta["stage"] == "pretrain"

    # SFT from the pretraining run: with lr 0 its parameters stay exactly the loaded ones.
    sft = str(tmp_path / "sft")
    finish(launch("experiments.sft", sft, "--config=configs/sft.py:tiny", f"--config.init_from={straight}",
                    "--config.train.steps=2", "--config.train.eval_every=0", "--config.optim.lr=0",
                    "--config.data.seq_len=64", f"--config.data.cache_dir={tmp_path / 'data'}", env=env))
    ps, sft_meta = _final_params(sft)
    jax.tree.map(np.testing.assert_array_equal, ps, pa)
    assert sft_meta["model"] == meta["model"] and sft_meta["stage"] == "sft"
    with open(os.path.join(sft, "tokenizer.model"), "rb") as f1, open(os.path.join(straight, "tokenizer.model"),
                                                                       "rb") as f2:
        assert f1.read() == f2.read()
    assert [r["step"] for r in read_metrics(os.path.join(sft, "metrics.jsonl"))][-1] == 2

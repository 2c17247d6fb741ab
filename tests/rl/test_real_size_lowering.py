"""Real-size (LLaMA-7B) steps lower on 8 fake devices from abstract arrays, nothing allocated: the PPO
rollout and learning steps as jitted for training, and the reward-model / DPO loss, gradient and AdamW
update with the configs' shardings. Shapes, shardings and the whole program are checked without hardware."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from configs import dpo as dpo_config
from configs import ppo as ppo_config
from configs import reward as reward_config
from lm import optim, sharding
from lm.loop import mesh_and_rules
from lm.model import boxed_params
from lm import runs
from lm.runs import model_config
from lm.train_step import state_shardings
from rl import dpo, ppo_step as pt, reward

S = jax.ShapeDtypeStruct


def _setup(config):
    cfg = model_config(config)
    mesh, rules = mesh_and_rules(config)
    tx, _ = optim.make_optimizer(config.optim, config.train.steps)
    return cfg, mesh, rules, tx


def test_ppo_llama_7b_steps_lower_on_8_devices():
    config = ppo_config.get_config("llama-7b")
    cfg, mesh, rules, tx = _setup(config)
    assert cfg.d_model == 4096 and cfg.n_layers == 32 and cfg.dtype == "bfloat16"
    hp = runs.recipe(pt.PPOConfig, config.ppo, "ppo")
    abstract, sh, frozen_sh = pt.state_shardings(cfg, tx, mesh, rules)
    # Parameters really are split over the 8 devices (FSDP on `embed`).
    wi = sh.params["actor"]["layers"]["mlp"]["wi"]["kernel"]
    assert wi.spec[1] == "fsdp" and mesh.shape["fsdp"] == 8
    steps = pt.make_steps(cfg, hp, tx, sh, frozen_sh, mesh, eos_id=2, pad_id=0, rules=rules)
    b, p, n = config.train.batch_size, config.data.prompt_len, hp.response_length
    prompts, lengths = S((b, p), jnp.int32), S((b,), jnp.int32)
    out = pt.SampleOutput(S((b, n), jnp.int32), S((b, n), jnp.float32), S((b, n), jnp.float32), S((b,), jnp.int32))
    frozen = {"ref": abstract.params["actor"], "reward": abstract.params["critic"]}
    ptx = {k: S((config.ptx.batch_size, config.ptx.seq_len), dt)
           for k, dt in (("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32))}
    with jax.set_mesh(mesh):
        rollout = steps.rollout_fn.lower(abstract.params, frozen, prompts, lengths, jax.random.key(0))
        learn = steps.learn_fn(("ptx",)).lower(abstract, frozen, prompts, lengths, out, ptx)
    assert rollout.out_info.tokens.shape == (b, n)
    new_state, metrics = learn.out_info
    assert new_state.params["actor"]["embed"]["embedding"].shape == (cfg.vocab_size, cfg.d_model)
    assert {"loss", "kl", "score", "ptx_loss", "skipped"} <= set(metrics)


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_reward_and_dpo_llama_7b_steps_lower_on_8_devices(stage):
    config = (reward_config if stage == "reward" else dpo_config).get_config("llama-7b")
    cfg, mesh, rules, tx = _setup(config)
    head = "scalar" if stage == "reward" else "lm"
    abstract, sh = state_shardings(lambda rng: boxed_params(cfg, rng, head), tx, mesh, rules)
    loss_fn = (reward.reward_loss_fn(cfg) if stage == "reward"
               else dpo.dpo_loss_fn(cfg, config.dpo.beta, config.dpo.label_smoothing))

    def step(state, batch):  # what lm.train_step's step runs: loss, gradient, AdamW update
        with nn.logical_axis_rules(rules):
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, state.rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), metrics

    b, k, t = config.train.batch_size, config.data.k, config.data.seq_len
    batch = {"tokens": S((b, k, t), jnp.int32), "inputs": S((b, k, t), jnp.int32),
             "targets": S((b, k, t), jnp.int32), "loss_mask": S((b, k, t), jnp.float32),
             "ranks": S((b, k), jnp.int32), "last_index": S((b, k), jnp.int32),
             "prompt_len": S((b, k), jnp.int32), "ref_logps": S((b, k), jnp.float32)}
    batch_sh = {k: sharding.batch_sharding(mesh, len(v.shape), rules) for k, v in batch.items()}
    with jax.set_mesh(mesh):
        lowered = jax.jit(step, in_shardings=(sh, batch_sh), out_shardings=(sh, None)).lower(abstract, batch)
    new_state, metrics = lowered.out_info
    assert jax.tree.structure(new_state.params) == jax.tree.structure(abstract.params)
    assert {"loss", "weight"} <= set(metrics)

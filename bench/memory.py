"""Per-device memory of real-size training steps, read from the compiled executables: nothing is allocated.

  python bench/memory.py [--model=llama-7b] [--devices=8] [--budget_gib=16] [--sft_batch=N] [--ppo_batch=N]

Each row compiles one step of `--model` on a (1, devices, 1) FSDP mesh of fake CPU devices with the real-size
recipes' settings (configs/sft.py and configs/ppo.py at `llama-7b`: bf16 matmuls, float32 parameters and AdamW
moments, full remat) and prints XLA's `memory_analysis()` of it, per device: arguments (parameters, optimiser
state, batch), outputs not aliased to arguments, and temporaries (activations, gradients, collectives). Rows:
  sft  the SFT step: masked LM loss, gradient, AdamW update, on `sft_batch` rows of `seq_len` tokens;
  ppo  the PPO learn step: actor and critic with AdamW, the frozen reference and reward model, on
       `ppo_batch` rollouts of prompt_len + response_length tokens (split into mini-batches inside the step).
Full fine-tuning only. Each row ends `fits 16 GiB: yes` or `fits 16 GiB: no` (the budget is `--budget_gib`),
so a script can read the table.
"""
from __future__ import annotations

import argparse
import os
import sys

DEVICES = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--devices=")), 8)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import ppo as ppo_config  # noqa: E402
from configs import sft as sft_config  # noqa: E402
from lm import losses, optim, runs, train_step  # noqa: E402
from lm.loop import mesh_and_rules  # noqa: E402
from lm.model import Transformer, boxed_params  # noqa: E402
from rl import ppo_step as pt  # noqa: E402

S = jax.ShapeDtypeStruct
GIB = 2**30


def _config(module, model: str):
    config = module.get_config("llama-7b")
    config.model.preset = model
    config.mesh.shape = (1, -1, 1)
    return config


def _row(name: str, compiled, budget: float, what: str) -> str:
    m = compiled.memory_analysis()
    args, out, alias, temp = (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                              m.temp_size_in_bytes)
    total = (args + out - alias + temp) / GIB
    return (f"| {name} | {what} | {args / GIB:.2f} | {(out - alias) / GIB:.2f} | {temp / GIB:.2f} | {total:.2f} | "
            f"fits {budget:g} GiB: {'yes' if total <= budget else 'no'} |")


def sft(model: str, rows: int, budget: float) -> str:
    config = _config(sft_config, model)
    cfg = runs.model_config(config)
    mesh, rules = mesh_and_rules(config)
    tx, _ = optim.make_optimizer(config.optim, config.train.steps)
    build = lambda rng: boxed_params(cfg, rng)  # noqa: E731
    abstract, shardings = train_step.state_shardings(build, tx, mesh, rules)
    step = train_step.make_train_step(losses.lm_loss_fn(Transformer(cfg)), tx, shardings, mesh, rules=rules)
    t = config.data.seq_len
    batch = {"inputs": S((rows, t), jnp.int32), "targets": S((rows, t), jnp.int32),
             "loss_mask": S((rows, t), jnp.float32)}
    with jax.set_mesh(mesh):
        compiled = step.lower(abstract, batch).compile()
    return _row("sft", compiled, budget, f"{rows} x {t} tokens")


def ppo(model: str, batch: int, budget: float) -> str:
    config = _config(ppo_config, model)
    cfg = runs.model_config(config)
    mesh, rules = mesh_and_rules(config)
    tx, _ = optim.make_optimizer(config.optim, config.train.steps)
    hp = runs.recipe(pt.PPOConfig, config.ppo, "ppo")
    abstract, sh, frozen_sh = pt.state_shardings(cfg, tx, mesh, rules)
    steps = pt.make_steps(cfg, hp, tx, sh, frozen_sh, mesh, eos_id=2, pad_id=0, rules=rules)
    b, p, n = batch, config.data.prompt_len, hp.response_length
    out = pt.SampleOutput(S((b, n), jnp.int32), S((b, n), jnp.float32), S((b, n), jnp.float32), S((b,), jnp.int32))
    frozen = {"ref": abstract.params["actor"], "reward": abstract.params["critic"]}
    with jax.set_mesh(mesh):
        compiled = steps.learn_fn.lower(abstract, frozen, S((b, p), jnp.int32), S((b,), jnp.int32), out).compile()
    return _row("ppo", compiled, budget, f"{b} rollouts of {p} + {n} tokens, {hp.mini_batches} mini-batches")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-7b", help="an lm.presets name")
    parser.add_argument("--devices", type=int, default=DEVICES, help="fake CPU devices (FSDP over all of them)")
    parser.add_argument("--budget_gib", type=float, default=16.0, help="memory per device to fit in")
    parser.add_argument("--sft_batch", type=int, default=0, help="SFT rows per step; 0 = configs/sft.py:llama-7b's")
    parser.add_argument("--ppo_batch", type=int, default=0, help="PPO rollouts per iteration; 0 = the config's")
    args = parser.parse_args()
    sft_batch = args.sft_batch or sft_config.get_config("llama-7b").train.batch_size
    ppo_batch = args.ppo_batch or ppo_config.get_config("llama-7b").train.batch_size
    print(f"{args.model} on {jax.device_count()} devices, per device, GiB (memory_analysis of the compiled step)")
    print("| step | batch | arguments | outputs | temporaries | total | fits |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(sft(args.model, sft_batch, args.budget_gib), flush=True)
    print(ppo(args.model, ppo_batch, args.budget_gib), flush=True)


if __name__ == "__main__":
    main()

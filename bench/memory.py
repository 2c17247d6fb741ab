"""Per-device memory of real-size training steps, read from the compiled executables: nothing is allocated.

  python bench/memory.py [--model=llama-7b] [--methods=full,lora,qlora] [--devices=8] [--budget_gib=16]
                         [--sft_batch=N,...] [--peft_sft_batch=N,...] [--ppo_batch=N,...] [--peft_ppo_batch=N,...]

First a table of the frozen base's bytes (`lm.peft.abstract_base` of `--model`, from shapes): float32, bfloat16,
and int8 / NF4 layer projections (codes + float32 block scales of 64; embeddings, norms and lm_head bfloat16).

Then each row compiles one step of `--model` on a (1, devices, 1) FSDP mesh of fake CPU devices with the real-size
recipes' settings (configs/sft.py and configs/ppo.py at `llama-7b`: bf16 matmuls, full remat, AdamW) and prints
XLA's `memory_analysis()` of it, per device: arguments (trainable params, optimiser state, frozen params, batch),
outputs not aliased to arguments, and temporaries (activations, gradients, collectives). Methods:
  full   full fine-tuning: float32 parameters and AdamW moments for every weight;
  lora   LoRA r=16, alpha 32 on q,k,v,o,wi,wg,wo: float32 adapters with AdamW on a frozen bfloat16 base;
  qlora  the same adapters on a frozen base whose layer projections are NF4 (blocks of 64), bfloat16 elsewhere.
Steps:
  sft  the SFT step: masked LM loss, gradient, AdamW update, on `sft_batch` (adapted: `peft_sft_batch`) rows of
       `seq_len` tokens;
  ppo  the PPO learn step: scoring (policy, reference, critic, reward model), GAE, then `epochs` x `mini_batches`
       updates of actor and critic, on `ppo_batch` (adapted: `peft_ppo_batch`) rollouts of prompt_len +
       response_length tokens. Full: actor and critic trained, reference and reward model frozen whole models.
       Adapted: one frozen base serves all four: actor and critic (with its score head) are adapter sets in the
       state, the reference is the base with the adapters off, the reward model a third (frozen) adapter set.
Each batch flag takes a comma-separated list (a row per batch); the adapted defaults are the largest powers of
two at which both adapted llama-7b rows fit. Each row ends `fits 16 GiB: yes` or `no` (the budget is
`--budget_gib`), so a script can read the table.

XLA:CPU has no bfloat16 matmul: it converts a bfloat16 base to float32 and hoists that out of the layer loop, so
the LoRA rows' temporaries hold a float32 copy of the base's shard that a backend with bfloat16 matmuls need not
make. XLA_FLAGS are kept (the device count is appended): `--xla_disable_hlo_passes=while-loop-invariant-code-motion`
leaves that copy out.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

DEVICES = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--devices=")), 8)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import ppo as ppo_config  # noqa: E402
from configs import sft as sft_config  # noqa: E402
from lm import losses, optim, peft, runs, train_step  # noqa: E402
from lm.loop import mesh_and_rules  # noqa: E402
from lm.model import Transformer  # noqa: E402
from rl import ppo_step as pt  # noqa: E402

S = jax.ShapeDtypeStruct
GIB = 2**30
METHODS = ("full", "lora", "qlora")
LABELS = {"full": "full", "lora": "LoRA r=16", "qlora": "QLoRA-NF4 r=16"}


def _setup(module, model: str, method: str):
    """`(config, cfg, mesh, rules, tx)` of the module's `llama-7b` recipe on `model`, adapted by `method`."""
    config = module.get_config("llama-7b")
    config.model.preset = model
    config.mesh.shape = (1, -1, 1)
    cfg = runs.model_config(config)
    if method != "full":  # a frozen base needs no float32 master copy
        pc = peft.PeftConfig(method=method, rank=16, alpha=32.0, targets="q,k,v,o,wi,wg,wo", quant="nf4",
                             quant_block=64)
        cfg = peft.adapt(cfg.replace(param_dtype="bfloat16"), pc)
    mesh, rules = mesh_and_rules(config)
    tx, _ = optim.make_optimizer(config.optim, config.train.steps)
    return config, cfg, mesh, rules, tx


def _shardings(tree):
    return jax.tree.map(lambda a: a.sharding, tree)


def _row(step: str, method: str, compiled, budget: float, what: str) -> str:
    m = compiled.memory_analysis()
    args, out, alias, temp = (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                              m.temp_size_in_bytes)
    total = (args + out - alias + temp) / GIB
    return (f"| {step} | {LABELS[method]} | {what} | {args / GIB:.2f} | {(out - alias) / GIB:.2f} | "
            f"{temp / GIB:.2f} | {total:.2f} | fits {budget:g} GiB: {'yes' if total <= budget else 'no'} |")


def sft(model: str, method: str, rows: int, budget: float) -> str:
    """The row of one SFT step (loss, gradient, AdamW) on `rows` x seq_len tokens."""
    config, cfg, mesh, rules, tx = _setup(sft_config, model, method)
    abstract, shardings = train_step.state_shardings(functools.partial(peft.boxed_trainable, cfg), tx, mesh, rules)
    frozen = (peft.abstract_base(cfg, "lm", mesh, rules),) if peft.enabled(cfg) else ()
    step = train_step.make_train_step(losses.lm_loss_fn(Transformer(cfg)), tx, shardings, mesh, rules=rules,
                                      frozen_shardings=_shardings(frozen[0]) if frozen else None)
    t = config.data.seq_len
    batch = {"inputs": S((rows, t), jnp.int32), "targets": S((rows, t), jnp.int32),
             "loss_mask": S((rows, t), jnp.float32)}
    with jax.set_mesh(mesh):
        compiled = step.lower(abstract, batch, *frozen).compile()
    return _row("sft", method, compiled, budget, f"{rows} x {t} tokens")


def ppo(model: str, method: str, batch: int, budget: float) -> str:
    """The row of one PPO learn step on `batch` rollouts (see the module docstring for the four models)."""
    config, cfg, mesh, rules, tx = _setup(ppo_config, model, method)
    hp = runs.recipe(pt.PPOConfig, config.ppo, "ppo")
    roles = pt.Roles(cfg, reward_cfg=cfg, reward_on_base=True) if peft.enabled(cfg) else pt.Roles(cfg)
    abstract, sh, frozen_sh = pt.state_shardings(roles, tx, mesh, rules)
    steps = pt.make_steps(roles, hp, tx, sh, frozen_sh, mesh, eos_id=2, pad_id=0, rules=rules)
    if peft.enabled(cfg):  # the reward adapters and head have the critic's shapes and layout
        frozen = {"base": peft.abstract_base(cfg, "lm", mesh, rules), "reward": abstract.params["critic"]}
    else:
        frozen = {"ref": abstract.params["actor"], "reward": abstract.params["critic"]}
    b, p, n = batch, config.data.prompt_len, hp.response_length
    out = pt.SampleOutput(S((b, n), jnp.int32), S((b, n), jnp.float32), S((b, n), jnp.float32), S((b,), jnp.int32))
    with jax.set_mesh(mesh):
        compiled = steps.learn_fn(()).lower(abstract, frozen, S((b, p), jnp.int32), S((b,), jnp.int32), out).compile()
    return _row("ppo", method, compiled, budget, f"{b} rollouts of {p} + {n} tokens, {hp.mini_batches} mini-batches")


def base_bytes(model: str) -> list[str]:
    """Rows of the frozen base's size in each storage format: GiB in all and per device."""
    _, cfg, mesh, rules, _ = _setup(sft_config, model, "full")
    formats = {"float32": cfg.replace(param_dtype="float32"), "bfloat16": cfg.replace(param_dtype="bfloat16"),
               "int8": cfg.replace(param_dtype="bfloat16", quant="int8"),
               "NF4": cfg.replace(param_dtype="bfloat16", quant="nf4")}
    lines = []
    for name, c in formats.items():
        leaves = jax.tree.leaves(peft.abstract_base(c, "lm", mesh, rules))
        total = sum(x.size * x.dtype.itemsize for x in leaves)
        per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in leaves)
        lines.append(f"| {name} | {total / GIB:.2f} | {per_device / GIB:.2f} |")
    return lines


def _batches(flag: str, default: int) -> list[int]:
    return [int(b) for b in flag.split(",")] if flag else [default]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-7b", help="an lm.presets name")
    parser.add_argument("--methods", default="full,lora,qlora", help=f"comma-separated, of {METHODS}")
    parser.add_argument("--devices", type=int, default=DEVICES, help="fake CPU devices (FSDP over all of them)")
    parser.add_argument("--budget_gib", type=float, default=16.0, help="memory per device to fit in")
    parser.add_argument("--sft_batch", default="", help="SFT rows per step; '' = configs/sft.py:llama-7b's")
    parser.add_argument("--peft_sft_batch", default="16", help="the same for LoRA / QLoRA")
    parser.add_argument("--ppo_batch", default="", help="PPO rollouts per iteration; '' = configs/ppo.py:llama-7b's")
    parser.add_argument("--peft_ppo_batch", default="256", help="the same for LoRA / QLoRA")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if set(methods) - set(METHODS):
        parser.error(f"--methods={args.methods}: each must be one of {METHODS}")
    sft_default = sft_config.get_config("llama-7b").train.batch_size
    ppo_default = ppo_config.get_config("llama-7b").train.batch_size
    batches = {("sft", False): _batches(args.sft_batch, sft_default),
               ("sft", True): _batches(args.peft_sft_batch, sft_default),
               ("ppo", False): _batches(args.ppo_batch, ppo_default),
               ("ppo", True): _batches(args.peft_ppo_batch, ppo_default)}
    print(f"{args.model} frozen base, GiB (from shapes; {jax.device_count()} devices, FSDP)")
    print("| format | total | per device |\n| --- | --- | --- |")
    print("\n".join(base_bytes(args.model)) + "\n", flush=True)
    print(f"{args.model} on {jax.device_count()} devices, per device, GiB (memory_analysis of the compiled step)")
    print("| step | method | batch | arguments | outputs | temporaries | total | fits |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, fn in (("sft", sft), ("ppo", ppo)):
        for method in methods:
            for b in batches[kind, method != "full"]:
                print(fn(args.model, method, b, args.budget_gib), flush=True)


if __name__ == "__main__":
    main()

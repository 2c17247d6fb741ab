"""The PPO run loop: prompts, models from the SFT and reward runs, checkpoints, resume and logging.

`train(config, workdir, ...)` is to PPO what lm.trainer.fit is to the other stages: it builds the mesh and
optimiser, restores the newest checkpoint of `WORKDIR/checkpoints` (actor, critic, optimiser, KL
coefficient, RNG, skip counters and the prompt/pretraining data position) or starts from the SFT and
reward runs, then runs `rl.ppo_trainer` iterations with logging and periodic checkpoints.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Iterable, Optional

import grain
import jax
import numpy as np

from lm import checkpoint, distributed, optim, sharding
from lm.config import ModelConfig
from lm.data import chat
from lm.logging_utils import MetricsLogger
from lm.tokenizer import Tokenizer
from lm.trainer import mesh_and_rules
from rl import ppo_trainer as pt
from rl import reward


def read_prompts(path: str, tokenizer: Tokenizer, width: int) -> list[np.ndarray]:
    """Chat-formatted prompt token ids of a `{"prompt": ...}` JSONL file; bad rows name the file and line."""
    prompts = []
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{i}: expected an object with a string 'prompt', got {line.strip()[:80]}")
            ids = chat.format_prompt(tokenizer, row["prompt"])
            if len(ids) > width:
                raise ValueError(f"{path}:{i}: the formatted prompt has {len(ids)} tokens, more than "
                                 f"data.prompt_len={width}")
            prompts.append(ids)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def prompt_dataset(prompts: list[np.ndarray], *, width: int, batch_size: int, seed: int, pad_id: int,
                   process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Endless shuffled batches `{"tokens": int32 [B, width] right-padded, "lengths": int32 [B]}`.

    Each process takes its own slice of the prompts; the iterator's position is checkpointable.
    """
    def pad(ids):
        return {"tokens": np.concatenate([ids, np.full(width - len(ids), pad_id, np.int32)]).astype(np.int32),
                "lengths": np.int32(len(ids))}
    ds = grain.MapDataset.source(prompts)[process_index::process_count].shuffle(seed).repeat(None).map(pad)
    return ds.to_iter_dataset().batch(batch_size, drop_remainder=True)


def abstract_frozen(cfg: ModelConfig, mesh, rules):
    """Sharded abstract params of the reference (LM head) and reward model (scalar head)."""
    return {"ref": reward.abstract_params(cfg, "lm", mesh, rules),
            "reward": reward.abstract_params(cfg, "scalar", mesh, rules)}


def load_policy(run_dir: str, cfg: ModelConfig, mesh, rules):
    """The actor's params from a PPO run's latest checkpoint (for evaluation or sampling)."""
    ckpt = os.path.join(run_dir, "checkpoints")
    abstract = {"actor": reward.abstract_params(cfg, "lm", mesh, rules),
                "critic": reward.abstract_params(cfg, "scalar", mesh, rules)}
    return checkpoint.load_params(ckpt if os.path.isdir(ckpt) else run_dir, abstract)["actor"]


def train(config, workdir: str, *, model_cfg: ModelConfig, tokenizer: Tokenizer, sft_dir: str, reward_dir: str,
          ptx_data: Optional[Iterable] = None, meta: Optional[dict] = None,
          on_iteration: Optional[Callable] = None) -> pt.PPOState:
    """Run `config.train.steps` PPO iterations (resuming from `workdir` if it holds a checkpoint).

    sft_dir / reward_dir: run directories (or their `checkpoints/`) of the SFT and reward-model stages.
    ptx_data: a grain IterDataset of LM batches (`config.ptx.batch_size` rows); needed when ppo.ptx_coef > 0.
    on_iteration: optional `f(iteration, metrics: dict of floats, out: SampleOutput, prompt_batch)`, e.g. for
      evaluation; prompt_batch holds this iteration's prompts (`tokens [B, P]`, `lengths [B]`).
    Returns the final state. Stops with `rl.ppo_trainer.NonFiniteError` after `ppo.max_bad_iterations`
    bad iterations in a row.
    """
    hp = pt.PPOConfig.from_mapping(config.ppo)
    tc = config.train
    if hp.ptx_coef > 0 and ptx_data is None:
        raise ValueError("ppo.ptx_coef > 0 needs pretraining data (ptx_data)")
    mesh, rules = mesh_and_rules(config)
    tx, lr = optim.make_optimizer(config.optim, tc.steps * hp.epochs * hp.mini_batches)
    abstract, shardings, frozen_sh = pt.state_shardings(model_cfg, tx, mesh, rules)
    frozen_abs = abstract_frozen(model_cfg, mesh, rules)
    frozen = {"ref": checkpoint.load_params(_ckpt_dir(sft_dir), frozen_abs["ref"]),
              "reward": reward.load(reward_dir, frozen_abs["reward"], normalize=config.reward_normalize)}

    n_proc = jax.process_count()
    if tc.batch_size % n_proc:
        raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by the {n_proc} processes")
    prompts = read_prompts(config.data.path, tokenizer, config.data.prompt_len)
    data = prompt_dataset(prompts, width=config.data.prompt_len, batch_size=tc.batch_size // n_proc,
                          seed=config.seed, pad_id=tokenizer.pad_id, process_index=jax.process_index(),
                          process_count=n_proc)
    if hp.ptx_coef > 0:
        data = grain.experimental.ZipIterDataset([data, ptx_data])
    data_iter = iter(data)

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=config.checkpoint.every_steps,
                                   max_to_keep=config.checkpoint.max_to_keep,
                                   async_save=config.checkpoint.async_save)
    if ckpt.latest_step() is not None:
        state = restore(ckpt, abstract, data_iter)
    else:
        if config.critic_init not in ("reward", "zeros"):
            raise ValueError(f"critic_init={config.critic_init!r} must be 'reward' or 'zeros'")
        critic = (frozen["reward"] if config.critic_init == "reward"
                  else reward.init_from_sft(model_cfg, frozen["ref"], jax.random.PRNGKey(config.seed), "zeros"))
        state = pt.init_state(frozen["ref"], critic, tx, hp.kl_coef, jax.random.PRNGKey(config.seed), shardings)
    start = int(state.step)
    steps = pt.make_steps(model_cfg, hp, tx, shardings, frozen_sh, mesh, eos_id=tokenizer.eos_id,
                          pad_id=tokenizer.pad_id, rules=rules)
    log = MetricsLogger(workdir, total_steps=tc.steps, start_step=start, enabled=distributed.is_primary())
    if start:
        log.message(f"resumed PPO from {ckpt.directory} at iteration {start}")
    meta = dict(meta or {})
    try:
        for it in range(start + 1, tc.steps + 1):
            t0 = time.perf_counter()
            batch = next(data_iter)
            prompt_batch, ptx = batch if hp.ptx_coef > 0 else (batch, None)
            prompt_batch = sharding.global_batch(prompt_batch, mesh, rules)  # this process's rows -> global
            ptx = None if ptx is None else sharding.global_batch(ptx, mesh, rules)
            state, metrics, out = steps.iteration(state, frozen, prompt_batch["tokens"], prompt_batch["lengths"],
                                                  ptx)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}  # one small read per iteration
            pt.check_finite(m, hp)
            m["lr"] = float(lr(int(state.step) * hp.epochs * hp.mini_batches))
            m["seconds"] = time.perf_counter() - t0
            if it % tc.log_every == 0 or it == tc.steps:
                log.write(it, m)
            log.progress(1, {"score": f"{m['score']:.3f}", "kl": f"{m['kl']:.3f}"})
            if on_iteration is not None:
                on_iteration(it, m, out, prompt_batch)
            save(ckpt, it, state, data_iter, meta, force=it == tc.steps)
        ckpt.wait()
    finally:
        log.close()
        ckpt.close()
    return state


def _ckpt_dir(path: str) -> str:
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def save(ckpt: checkpoint.Checkpointer, step: int, state: pt.PPOState, data_iter, meta: dict,
         force: bool = False) -> bool:
    """Checkpoint a PPO state; the KL coefficient (a scalar) travels in the JSON metadata."""
    if not (force or ckpt.should_save(step)):
        return False
    return ckpt.save(step, state, data_iter, dict(meta, stage="ppo", kl_coef=float(state.kl_coef)), force=True)


def restore(ckpt: checkpoint.Checkpointer, abstract: pt.PPOState, data_iter=None,
            step: Optional[int] = None) -> pt.PPOState:
    """The PPO state of checkpoint `step` (default: latest) laid out as `abstract` (any mesh)."""
    step = ckpt.latest_step() if step is None else step
    train_state = ckpt.restore(abstract, step=step, data_iter=data_iter)
    kl_coef = checkpoint.load_meta(ckpt.directory, step)["kl_coef"]
    kl = jax.device_put(np.float32(kl_coef), abstract.kl_coef.sharding)
    return pt.PPOState(step=train_state.step, params=train_state.params, opt_state=train_state.opt_state,
                       kl_coef=kl, rng=train_state.rng, skipped=train_state.skipped,
                       bad_streak=train_state.bad_streak)

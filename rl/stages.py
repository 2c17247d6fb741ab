"""The RLHF stages as library functions `(config, workdir) -> workdir`: reward model, PPO and DPO.

Each starts from the SFT run named by `config.init_from` (its model and tokenizer), trains through the one
loop (lm.loop: resume, logging, checkpoints, preemption) and leaves a run directory that `lm.load` reads.
Their launchers (`python -m experiments.reward|ppo|dpo`) and the pipeline call these.

A new RL method is a pure loss/advantage function (next to rl.ppo) plus a step (next to rl.ppo_step) and a
stage function here that hands both to `lm.loop.run` as a `Program`; see docs/architecture.md.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Callable, Iterable, Optional

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from lm import data, distributed, loop, optim, peft, runs, sharding
from lm.data import builders
from lm.config import ModelConfig
from lm.model import abstract_params, scalar_params
from rl import dpo as dpo_lib
from rl import evaluate as rl_evaluate
from rl import ppo_step as ps
from rl import reward as reward_lib
from rl.algorithms import RLConfig


def score_statistics(cfg, params, batches: Iterable, num_batches: int, mesh, rules) -> tuple[float, float, int]:
    """`(mean, std, count)` of a reward model's scores of the present responses in `num_batches` preference
    batches (this process's rows; when its iterator ends first, rows with no response stand in, so every
    process runs the same number of sharded steps), summed over all processes."""
    @jax.jit
    def sums(p, b):
        with nn.logical_axis_rules(rules):
            scores = reward_lib.score_responses(cfg, p, b["tokens"], b["last_index"], b["prompt_len"])
        w = (b["ranks"] >= 0).astype(jnp.float32)
        return jnp.stack([w.sum(), (scores * w).sum(), (scores * scores * w).sum()])

    keys = ("tokens", "last_index", "prompt_len", "ranks")
    total, empty, it = np.zeros(3), None, iter(batches)
    with jax.set_mesh(mesh):
        for _ in range(num_batches):
            batch = next(it, None)
            if batch is None:
                batch = empty
            else:
                batch = {k: batch[k] for k in keys}
                empty = dict(batch, ranks=np.full_like(batch["ranks"], -1))
            total += np.asarray(jax.device_get(sums(params, sharding.global_batch(batch, mesh, rules))), np.float64)
    n, s, ss = total
    mean = s / max(n, 1.0)
    return float(mean), float(max(ss / max(n, 1.0) - mean * mean, 0.0) ** 0.5), int(n)


def reward(config, workdir: str) -> str:
    """Train a reward model from the SFT run on ranked responses (InstructGPT's K-wise ranking loss).

    The trunk is copied from the SFT run and a new scalar head added (`reward.head_init`); with `reward.lm_coef`
    the LM head stays and trains on the best-ranked responses beside the ranking loss. With
    `reward.normalize`, every training response is scored at the end and the statistics saved
    (`reward_norm.json`), so `rl.reward.load` gives scores with mean 0 and std 1 on the SFT policy's responses.
    """
    hp = runs.recipe(reward_lib.RewardConfig, config.reward, "reward")
    model_cfg, sft_params, tok = runs.start(config, workdir, needs="(SFT) the reward model starts from")
    mesh, rules = loop.mesh_and_rules(config)
    model_cfg, frozen = runs.adapt(config, model_cfg, sft_params, hp.head, mesh, rules)

    def init_params(abstract):
        sft = sft_params(abstract_params(model_cfg, "lm", mesh, rules))
        params = reward_lib.init_from_sft(model_cfg, sft, jax.random.PRNGKey(config.seed), hp.head_init, hp.head)
        return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params, abstract)

    d = config.data
    kw = dict(runs.data_kwargs(config), k=d.k, overlong=d.overlong, field_map=d.field_map)
    eval_data = data.preference_dataset(d.path, tok, split="eval", **kw) if config.train.eval_every else None
    # With adapters, init_params is not used: the score head is a fresh `normal` one beside fresh adapters.
    state = loop.fit(config, workdir, loss_fn=reward_lib.reward_loss_fn(model_cfg, hp.lm_coef),
                     build_params=lambda rng: peft.boxed_trainable(model_cfg, rng, head=hp.head),
                     train_data=data.preference_dataset(d.path, tok, split="train", **kw), eval_data=eval_data,
                     init_params=init_params if frozen is None else None, frozen=frozen,
                     meta=runs.run_meta(config, model_cfg, "reward", head=hp.head))
    if hp.normalize:
        # One pass over the training split, as the trainer tokenises it (each response once).
        rows = len(builders.data_source("preference", d.path, "train", cache_dir=d.cache_dir or None,
                                        eval_fraction=d.eval_fraction, field_map=d.field_map))
        per_process = -(-rows // jax.process_count())
        num_batches = -(-per_process // runs.local_batch_size(config))
        if hp.normalize_batches:
            num_batches = min(num_batches, hp.normalize_batches)
        batches = data.preference_dataset(d.path, tok, split="train", **dict(kw, num_epochs=1))
        params = state.params if frozen is None else peft.merge(frozen.params, state.params)
        params = scalar_params(params)  # a run with reward.lm_coef trains head "lm+scalar"
        mean, std, n = score_statistics(model_cfg, params, batches, num_batches, mesh, rules)
        if distributed.is_primary():
            path = reward_lib.save_normalization(workdir, mean, std, n)
            logging.info("reward scores of %d training responses: mean %.4f, std %.4f (saved to %s)", n, mean, std,
                         path)
    return workdir


def dpo(config, workdir: str) -> str:
    """Train a policy with DPO from the SFT run on ranked responses, against the frozen SFT model."""
    hp = runs.recipe(dpo_lib.DPOConfig, config.dpo, "dpo")
    model_cfg, sft_params, tok = runs.start(config, workdir, needs="(SFT): policy start and reference")
    mesh, rules = loop.mesh_and_rules(config)
    adapted, frozen = runs.adapt(config, model_cfg, sft_params, "lm", mesh, rules)
    if frozen is None:
        ref_cfg, ref = model_cfg, sft_params(abstract_params(model_cfg, "lm", mesh, rules))
    else:  # the reference is the frozen base with the adapters off: no second copy
        ref_cfg, ref = peft.base_config(adapted), frozen.params
    d = config.data
    kw = dict(runs.data_kwargs(config), k=d.k, overlong=d.overlong, field_map=d.field_map)

    def dataset(split):
        prefs = data.preference_dataset(d.path, tok, split=split, **kw)
        return dpo_lib.with_reference_logps(prefs, ref_cfg, ref, mesh, rules)

    loop.fit(config, workdir, loss_fn=dpo_lib.dpo_loss_fn(adapted, hp.beta, hp.label_smoothing),
             build_params=functools.partial(peft.boxed_trainable, adapted), train_data=dataset("train"),
             eval_data=dataset("eval") if config.train.eval_every else None,
             init_params=sft_params if frozen is None else None, frozen=frozen,
             meta=runs.run_meta(config, adapted, "dpo", head="lm"))
    return workdir


def ppo(config, workdir: str, on_iteration: Optional[Callable] = None) -> str:
    """RLHF: the SFT policy optimised against the reward model with a KL penalty, by PPO (default) or the
    algorithm `rl.algorithm` names (GRPO, RLOO, ReMax, REINFORCE++, best-of-n, online DPO; rl.algorithms).

    Actor and reference come from `init_from` (SFT); the reward model (normalised, `reward_normalize`) and by
    default PPO's critic (`critic_init`) from `reward_from`; a Python reward function `rl.reward_fn` adds to
    it or, with `reward_from=""`, replaces it; prompts from `data.path`; with `ppo.ptx_coef > 0` pretraining
    batches from `ptx.path` (PPO-ptx). `train.steps` counts iterations (one rollout batch of
    `train.batch_size` prompts, `rl.group_size` samples each). on_iteration: optional `f(iteration, metrics:
    dict of floats, out: lm.generation.SampleOutput, prompt_batch)` after each iteration, e.g. to grade the
    rollouts (`prompt_batch` has a row per sample: each prompt repeated `rl.group_size` times); it runs on
    every process, and `out` and `prompt_batch` are global arrays (read them whole only where a process holds
    them all, as in a single-process run).
    """
    alg = runs.recipe(RLConfig, config.rl, "rl") if "rl" in config else RLConfig()
    if not config.init_from or not (config.reward_from or alg.reward_fn):
        raise ValueError("config.init_from (the SFT run) and a reward (config.reward_from, the reward run, and/or "
                         "config.rl.reward_fn) are required")
    if alg.critic and not config.reward_from and config.critic_init == "reward":
        raise ValueError("critic_init='reward' needs config.reward_from; set critic_init=zeros with a reward_fn only")
    if config.critic_init not in ("reward", "zeros"):
        raise ValueError(f"critic_init={config.critic_init!r} must be 'reward' or 'zeros'")
    hp = runs.recipe(ps.PPOConfig, config.ppo, "ppo")
    reward_fn = load_reward_fn(alg.reward_fn) if alg.reward_fn else None
    model_cfg, sft_params, tok = runs.start(config, workdir, needs="(SFT): actor and reference")
    mesh, rules = loop.mesh_and_rules(config)
    tc = config.train
    sharding.check_batch(tc.batch_size, 1, mesh, rules)  # prompts per iteration, split over the batch axes
    tx, lr = optim.make_optimizer(config.optim, tc.steps * hp.epochs * hp.mini_batches)
    adapted, base = runs.adapt(config, model_cfg, sft_params, "lm", mesh, rules)
    if base is None:
        roles, frozen = ps.Roles(model_cfg), {"ref": sft_params(abstract_params(model_cfg, "lm", mesh, rules))}
        if config.reward_from:
            frozen["reward"] = reward_lib.load(config.reward_from, cfg=model_cfg, mesh=mesh, rules=rules,
                                               normalize=config.reward_normalize)[1]
    else:  # one frozen base for all four models
        roles, frozen = ps.Roles(adapted), {"base": base.params}
        if config.reward_from:
            roles, frozen["reward"] = _reward_on(config, adapted, model_cfg, mesh, rules)
    roles = dataclasses.replace(roles, has_critic=alg.critic, has_reward_model=bool(config.reward_from))
    abstract, shardings, frozen_sh = ps.state_shardings(roles, tx, mesh, rules)

    n = jax.process_count()
    prompts = data.read_prompts(config.data.path, tok, config.data.prompt_len, config.data.field_map)
    batches = data.prompt_dataset(prompts, width=config.data.prompt_len, batch_size=runs.local_batch_size(config),
                                  seed=config.seed, pad_id=tok.pad_id, process_index=jax.process_index(),
                                  process_count=n)
    if hp.ptx_coef > 0:
        p = config.ptx
        ptx = data.pretrain_dataset(p.path, tok, seq_len=p.seq_len, seed=config.seed, objective=p.objective,
                                    batch_size=runs.local_batch_size(config, p.batch_size, "ptx.batch_size"),
                                    cache_dir=p.cache_dir or None, eval_fraction=p.eval_fraction,
                                    process_index=jax.process_index(), process_count=n)
        batches = grain.experimental.ZipIterDataset([batches, ptx])

    def fresh():
        rng = jax.random.PRNGKey(config.seed)
        if base is None:
            critic = (None if not alg.critic else frozen["reward"] if config.critic_init == "reward"
                      else reward_lib.init_from_sft(model_cfg, frozen["ref"], rng, "zeros"))
            return ps.init_state(frozen["ref"], critic, tx, hp.kl_coef, rng, shardings)
        actor = peft.init_trainable(adapted, rng, "lm", shardings.params["actor"])
        if not alg.critic:
            critic = None
        elif config.critic_init == "reward":
            critic = frozen["reward"]
            shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)  # noqa: E731
            if not roles.reward_on_base or shapes(critic) != shapes(abstract.params["critic"]):
                raise ValueError("critic_init='reward' with adapters needs a reward model of the same adapters on the "
                                 f"same base (a reward run with the same config.peft from {config.init_from}); "
                                 "set critic_init=zeros to train the critic's adapters from a zero head")
        else:
            critic = peft.init_trainable(adapted, jax.random.fold_in(rng, 1), "scalar", shardings.params["critic"])
            critic = dict(critic, score=jax.tree.map(jnp.zeros_like, critic["score"]))
        return ps.init_state(actor, critic, tx, hp.kl_coef, rng, shardings)

    steps = ps.make_steps(roles, hp, tx, shardings, frozen_sh, mesh, eos_id=data.chat.stop_id(tok),
                          pad_id=tok.pad_id, rules=rules, lr_schedule=lr, alg=alg)
    score_text = None if reward_fn is None else functools.partial(_text_rewards, reward_fn, tok, mesh, rules)

    def step(state, batch):
        prompt_batch, ptx_batch = batch if hp.ptx_coef > 0 else (batch, None)
        prompt_batch = sharding.global_batch(prompt_batch, mesh, rules)  # this process's rows -> global
        ptx_batch = None if ptx_batch is None else sharding.global_batch(ptx_batch, mesh, rules)
        state, metrics, out = steps.iteration(state, frozen, prompt_batch["tokens"], prompt_batch["lengths"],
                                              ptx_batch, reward_fn=score_text)
        return state, metrics, (out, ps.expand(prompt_batch, alg.group_size))

    def on_step(it, metrics, aux):
        if on_iteration is not None:
            on_iteration(it, metrics, *aux)

    loop.run(config, workdir, loop.Program(
        abstract_state=abstract, init_state=fresh, step=step, data=batches, on_step=on_step,
        max_bad_steps=hp.max_bad_iterations, bad_steps_flag="ppo.max_bad_iterations",
        hint="Lower the learning rate, clip scores (ppo.score_clip) or check the reward model.",
        progress=("score", "kl"),
        meta=runs.run_meta(config, adapted, "ppo", params={"actor": "lm", "critic": "scalar"} if alg.critic
                           else {"actor": "lm"}, policy="actor")))
    return workdir


def load_reward_fn(spec: str) -> Callable:
    """The Python reward function named `"module:function"` (`rl.reward_fn`), imported; errors name the spec."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"rl.reward_fn={spec!r} must be 'module:function', e.g. 'experiments.qa_task:gold_reward'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rl.reward_fn={spec!r}: cannot import {name} from {module}: {e}") from e
    if not callable(fn):
        raise ValueError(f"rl.reward_fn={spec!r} is not callable")
    return fn


def _text_rewards(reward_fn: Callable, tok, mesh, rules, prompt_tokens, prompt_lengths, out) -> jax.Array:
    """A Python reward function's scores of the samples `out` as a global `[B]` array: every process decodes
    all rows (gathered) and calls `reward_fn(prompts=, completions=, completion_ids=)` (TRL's signature) on
    them, and keeps its own rows. Completions are cut at the end of turn; ids keep it."""
    prompts, lengths, tokens, n = (np.asarray(a) for a in multihost_utils.process_allgather(
        (prompt_tokens, prompt_lengths, out.tokens, out.lengths), tiled=True))
    ids = [[int(t) for t in row[:k]] for row, k in zip(tokens, n)]
    scores = reward_fn(prompts=[tok.decode(p[:m]) for p, m in zip(prompts, lengths)],
                       completions=[rl_evaluate.response_text(tok, i) for i in ids], completion_ids=ids)
    scores = np.asarray(scores, np.float32)
    if scores.shape != (len(ids),):
        raise ValueError(f"rl.reward_fn returned {scores.shape} scores for {len(ids)} completions; it must return "
                         "one float per completion")
    sh = sharding.batch_sharding(mesh, 1, rules)
    return jax.make_array_from_callback(scores.shape, sh, lambda index: scores[index])


def _reward_on(config, adapted, model_cfg, mesh, rules):
    """`(ps.Roles, reward params)` of an adapted PPO run: the reward model as adapters on the policy's frozen
    base when `reward_from` is a run of adapters on the same `init_from` with the same base format; else the
    whole reward model (merged), a second copy of the weights."""
    meta = runs.load_meta(config.reward_from) if not runs.is_hf_dir(config.reward_from) else {}
    saved = ModelConfig.from_dict(meta["model"]) if "model" in meta else None
    same_base = (saved is not None and peft.enabled(saved) and meta.get("base") == os.path.abspath(config.init_from)
                 and (saved.quant, saved.quant_block) == (adapted.quant, adapted.quant_block))
    if not same_base:
        logging.info("ppo: the reward model %s is not adapters on %s: it is loaded whole", config.reward_from,
                     config.init_from)
        _, rm = reward_lib.load(config.reward_from, cfg=model_cfg, mesh=mesh, rules=rules,
                                normalize=config.reward_normalize)
        return ps.Roles(adapted), rm
    rm = runs.read_trainable(config.reward_from, saved, meta, "scalar", mesh, rules)
    if config.reward_normalize:
        rm = reward_lib.normalized(config.reward_from, rm)
    return ps.Roles(adapted, reward_cfg=saved, reward_on_base=True), rm

"""PPO's step: four models under one mesh, jitted rollout and learning steps, skip-on-NaN (the loop is lm.loop).

Actor (policy, from SFT) and critic (scalar head, from the reward model or zero-init) are trained together
in one `PPOState` with one optimiser, on `policy_loss + vf_coef * value_loss - ent_coef * entropy
+ ptx_coef * lm_loss` (TRL's combined objective, plus InstructGPT's PPO-ptx term). The reference (SFT) and
the reward model are frozen inputs. One iteration is two jitted calls with no host round trip between them:
`rollout` (the KV-cache sampler of lm.generation) and `learn` (scoring, rewards, GAE, then several epochs of
shuffled mini-batch updates as nested `lax.scan`s).

With adapters (a config with LoRA, prompt or prefix tuning; lm.peft) one frozen base serves all four roles:
the state holds the actor's and the critic's adapter sets (the critic's with its `score` head), the frozen
inputs are `{"base": ..., "reward": ...}`, the reference is the base with the adapters off, and the reward
model is a whole model or, `reward_on_base`, a third adapter set on the same base. Rollouts sample from
base + actor adapters as they are (no merge, no copy). `Roles` says which params each model reads.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm import peft, sharding
from lm.config import ModelConfig
from lm.generation import SampleOutput, sample
from lm.losses import lm_loss, model_kwargs
from lm.model import Transformer, abstract_params
from rl import algorithms, ppo
from rl.dpo import dpo_loss
from rl.algorithms import RLConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """PPO recipe. Defaults follow TRL's PPOTrainer unless noted; configs/ppo.py documents the field's origins.

    Attributes:
      response_length: tokens sampled per prompt (TRL 53).
      temperature: sampling temperature; log-probs are recomputed at the same temperature (TRL 0.7).
      kl_coef: initial coefficient beta of the per-token KL penalty (TRL 0.05, InstructGPT 0.02).
      kl_estimator: "k1" (log-ratio; TRL default) or "k3" (non-negative, unbiased), or "k2".
      adaptive_kl: Ziegler et al.'s proportional controller instead of a fixed beta (TRL: fixed).
      kl_target: target per-sequence KL of the adaptive controller (Ziegler et al. 6).
      kl_horizon: horizon of the adaptive controller, in sequences (Ziegler et al. 10000).
      gamma: discount (TRL 1.0). lam: GAE lambda (TRL 0.95).
      clip: policy ratio clip epsilon (TRL 0.2). value_clip: value clip range (TRL 0.2).
      vf_coef: weight of the value loss (TRL 0.1). ent_coef: entropy bonus (TRL none: 0.0).
      epochs: PPO epochs over each rollout batch (TRL 4; DeepSpeed-Chat 1).
      mini_batches: mini-batches per epoch (TRL 1).
      whiten_advantages: normalise advantages over the batch (TRL yes; DeepSpeed-Chat no).
      whiten_rewards: normalise per-token rewards before GAE (TRL no).
      missing_eos_penalty: subtracted from the score of a response without EOS (TRL None: 0.0 disables).
      score_clip: clip reward-model scores to +-score_clip (DeepSpeed-Chat 5.0; 0 disables).
      ptx_coef: weight of the pretraining loss mixed into the update, PPO-ptx (InstructGPT 27.8; 0 = plain PPO).
      max_bad_iterations: stop after this many iterations in a row with a skipped (non-finite) update.
    """

    response_length: int = 53
    temperature: float = 0.7
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    epochs: int = 4
    mini_batches: int = 1
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    missing_eos_penalty: float = 0.0
    score_clip: float = 0.0
    ptx_coef: float = 0.0
    max_bad_iterations: int = 3

    def __post_init__(self):
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"PPOConfig.kl_estimator={self.kl_estimator!r} must be 'k1', 'k2' or 'k3'")
        for name in ("response_length", "epochs", "mini_batches", "max_bad_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"PPOConfig.temperature must be > 0 (PPO samples), got {self.temperature}")


@flax.struct.dataclass
class PPOState:
    """Trainable PPO state; all leaves are arrays so it checkpoints as one pytree.

    step: PPO iterations done. params: `{"actor": lm params, "critic": scalar-head params}`.
    opt_state: optax state over params. kl_coef: current KL coefficient. rng: PRNG key.
    skipped: mini-batch updates skipped for non-finite loss/gradients. bad_streak: iterations in a row
    that had a skipped update or non-finite rewards.
    """
    step: jax.Array
    params: Any
    opt_state: Any
    kl_coef: jax.Array
    rng: jax.Array
    skipped: jax.Array
    bad_streak: jax.Array


@dataclasses.dataclass(frozen=True)
class Roles:
    """Which config and params each of PPO's four models uses (static under jit).

    cfg: the policy's model; with adapters (`peft.enabled`) the state holds adapter sets on `frozen["base"]`.
    reward_cfg: the reward model's; None means `cfg` without adapters.
    reward_on_base: the reward model is `frozen["reward"]` adapters (and head) on `frozen["base"]`.
    has_critic: the state trains a critic beside the actor (PPO; the critic-free algorithms have none).
    has_reward_model: `frozen["reward"]` exists (False: rewards come only from a Python reward function).
    """
    cfg: ModelConfig
    reward_cfg: Optional[ModelConfig] = None
    reward_on_base: bool = False
    has_critic: bool = True
    has_reward_model: bool = True

    @property
    def adapted(self) -> bool:
        return peft.enabled(self.cfg)

    def actor(self, params, frozen):
        return peft.merge(frozen["base"], params["actor"]) if self.adapted else params["actor"]

    def critic(self, params, frozen):
        return peft.merge(frozen["base"], params["critic"]) if self.adapted else params["critic"]

    def ref(self, frozen) -> tuple[ModelConfig, Any]:
        return (peft.base_config(self.cfg), frozen["base"]) if self.adapted else (self.cfg, frozen["ref"])

    def reward(self, frozen) -> tuple[ModelConfig, Any]:
        cfg = self.reward_cfg or peft.plain_config(self.cfg)
        return cfg, peft.merge(frozen["base"], frozen["reward"]) if self.reward_on_base else frozen["reward"]


def _roles(cfg) -> Roles:
    return cfg if isinstance(cfg, Roles) else Roles(cfg)


def _boxed_params(roles: Roles, rng):
    a, c = jax.random.split(rng)
    params = {"actor": peft.boxed_trainable(roles.cfg, a)}
    if roles.has_critic:
        params["critic"] = peft.boxed_trainable(roles.cfg, c, head="scalar")
    return params


def _state(params, tx, kl_coef, rng):
    zero = jnp.zeros((), jnp.int32)
    return PPOState(step=zero, params=params, opt_state=tx.init(params), kl_coef=jnp.float32(kl_coef), rng=rng,
                    skipped=zero, bad_streak=zero)


def state_shardings(cfg, tx, mesh: Mesh, rules=sharding.RULES):
    """`(abstract_state, state_shardings, frozen_shardings)` for a ModelConfig or `Roles`; frozen is
    `{"ref": ..., "reward": ...}`, or with adapters `{"base": ..., "reward": ...}` (no "reward" without a
    reward model).

    Everything comes from `jax.eval_shape` of the boxed init (nothing is allocated), so this also serves to
    lower the real-size steps abstractly.
    """
    roles = _roles(cfg)
    boxed = jax.eval_shape(lambda r: _state(_boxed_params(roles, r), tx, 0.0, r), jax.random.PRNGKey(0))
    shardings = sharding.tree_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
                            shardings)

    def shardings_of(tree):
        return jax.tree.map(lambda a: a.sharding, tree)

    reward = abstract_params(roles.reward_cfg or peft.plain_config(roles.cfg), "scalar", mesh, rules)
    if roles.adapted:
        frozen = {"base": shardings_of(peft.abstract_base(roles.cfg, "lm", mesh, rules))}
        reward = peft.split(reward, "scalar")[1] if roles.reward_on_base else reward
    else:
        frozen = {"ref": shardings.params["actor"]}
    if roles.has_reward_model:
        frozen["reward"] = shardings_of(reward)
    return abstract, shardings, frozen


def init_state(actor_params, critic_params, tx, kl_coef: float, rng, shardings) -> PPOState:
    """A PPO state from existing actor (SFT) and critic (reward model or zero-head) params, laid out sharded;
    `critic_params=None` for the critic-free algorithms.

    rng: a raw `jax.random.PRNGKey` (uint32 [2]) or a typed key (stored raw, so it checkpoints).
    """
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    params = {"actor": actor_params} if critic_params is None else {"actor": actor_params, "critic": critic_params}
    build = jax.jit(lambda p, r: _state(p, tx, kl_coef, r), out_shardings=shardings)
    with jax.set_mesh(shardings.kl_coef.mesh):
        return build(params, rng)


def assemble(prompt_tokens, prompt_lengths, out: SampleOutput, pad_id: int):
    """Join right-padded prompts and their samples into contiguous rows.

    Returns `(tokens [B, P + N], resp_index [B, N])`: row b is its prompt's `prompt_lengths[b]` tokens, the
    response, then `pad_id`; `resp_index[b, i] = prompt_lengths[b] - 1 + i` is the position whose output
    predicts response token i (and where the critic's value for that step is read).
    """
    b, p = prompt_tokens.shape
    n = out.tokens.shape[1]
    pos = jnp.arange(p + n)[None, :]
    lengths = prompt_lengths[:, None].astype(jnp.int32)
    from_prompt = jnp.take_along_axis(prompt_tokens, jnp.minimum(pos, p - 1).repeat(b, 0), axis=1)
    rel = pos - lengths
    from_resp = jnp.take_along_axis(out.tokens, jnp.clip(rel, 0, n - 1), axis=1)
    in_resp = (rel >= 0) & (rel < n)
    tokens = jnp.where(pos < lengths, from_prompt, jnp.where(in_resp, from_resp, pad_id)).astype(jnp.int32)
    return tokens, lengths - 1 + jnp.arange(n)[None, :]


def _gather(x, index):
    """x `[B, T, ...]` at positions index `[B, N]` -> `[B, N, ...]`."""
    idx = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def lm_head(cfg: ModelConfig, params, hidden):
    """The model's output layer on final hidden states `[M, E]` -> float32 logits `[M, V]`.

    Applying it only at the response positions (`[B * N, E]` rows, not `[B, P + N, E]`) skips the prompt's
    logits and, as a 2-D matmul, keeps XLA on its fast GEMM path in the backward pass.
    """
    w = params["embed"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]
    dtype = cfg.compute_dtype
    out = jnp.dot(hidden.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    if "lm_head" in cfg.lora_target_set:  # as lm.model.Dense computes it
        a, b = params["lm_head"]["lora_a"].astype(dtype), params["lm_head"]["lora_b"].astype(dtype)
        out = out + jnp.dot(jnp.dot(hidden.astype(dtype), a), b, preferred_element_type=jnp.float32) * cfg.lora_scale
    return out


def _policy_outputs(cfg: ModelConfig, params, tokens, resp_index, resp_tokens, prefix_len, temperature):
    """Log-probs `[B, N]` of the response tokens at `temperature` and the logits `[B, N, V]` they come from."""
    _, hidden = Transformer(cfg).apply({"params": params}, tokens, prefix_len=prefix_len, return_hidden=True)
    b, n = resp_index.shape
    hidden = _gather(hidden, resp_index).reshape(b * n, -1)  # the full-sequence logits are never computed
    logits = lm_head(cfg, params, hidden).reshape(b, n, -1) / temperature
    return ppo.token_logprobs(logits, resp_tokens), logits


def _values(cfg: ModelConfig, params, tokens, index, prefix_len):
    values = Transformer(cfg, head="scalar").apply({"params": params}, tokens, prefix_len=prefix_len)
    return _gather(values, index)


def expand(x, group_size: int):
    """Each row of `x` (any leading-batch pytree) repeated `group_size` times in a row: `[B, ...] -> [B * G, ...]`."""
    return x if group_size == 1 else jax.tree.map(lambda a: jnp.repeat(a, group_size, axis=0), x)


def has_eos(out: SampleOutput, eos_id: Optional[int]):
    """Whether each sample emitted `eos_id` (all True without an EOS token: nothing to penalise)."""
    if eos_id is None:
        return jnp.ones(out.mask.shape[:1], bool)
    return jnp.any((out.tokens == eos_id) & (out.mask > 0), axis=1)


def sequence_scores(roles: Roles, hp: PPOConfig, frozen, tokens, prompt_lengths, out: SampleOutput, fn_scores=None,
                    *, eos_id: Optional[int]):
    """Each sample's scalar reward `[B]`: the reward model's score at its last token (clipped to
    `hp.score_clip`), plus `fn_scores` (a Python reward function's), minus the missing-EOS penalty.

    tokens: the assembled prompt + response rows (`assemble`)."""
    scores = jnp.zeros(out.mask.shape[:1], jnp.float32)
    if roles.has_reward_model:
        prefix_len = prompt_lengths.astype(jnp.int32)
        last = prefix_len + ppo.last_token_index(out.mask)
        scores = _values(*roles.reward(frozen), tokens, last[:, None], prefix_len)[:, 0]
        if hp.score_clip > 0:
            scores = jnp.clip(scores, -hp.score_clip, hp.score_clip)
    if fn_scores is not None:
        scores = scores + fn_scores.astype(jnp.float32)
    return ppo.score_with_eos_penalty(scores, has_eos(out, eos_id), hp.missing_eos_penalty)


def _loss_temperature(hp: PPOConfig, alg: RLConfig) -> float:
    # The policy-gradient methods score tokens at the sampling temperature (TRL); the supervised ones (SFT on
    # the best sample, DPO) train the model itself, at temperature 1.
    return hp.temperature if alg.policy_gradient else 1.0


def make_experience(cfg, hp: PPOConfig, params, frozen, prompt_tokens, prompt_lengths,
                    out: SampleOutput, kl_coef, *, eos_id: Optional[int], pad_id: int, alg: RLConfig = RLConfig(),
                    fn_scores=None, baseline=None):
    """Score a rollout: old log-probs, reference log-probs, rewards, advantages (`alg`'s estimator), and for PPO
    the critic's values and GAE returns.

    cfg: a ModelConfig or `Roles`. prompt_tokens/prompt_lengths: one row per sample (prompts repeated G
    times). fn_scores: a Python reward function's scores `[B]`, or None. baseline: ReMax's greedy rewards
    `[B / G]`. Returns `(experience, metrics, finite)`: a dict of `[B', ...]` arrays for the update (best-of-n
    keeps each group's best sample, online DPO its best and worst), rollout metrics, and whether the rewards
    and advantages are finite.
    """
    roles = _roles(cfg)
    cfg = roles.cfg
    g = alg.group_size
    tokens, resp_index = assemble(prompt_tokens, prompt_lengths, out, pad_id)
    mask = out.mask
    prefix_len = prompt_lengths.astype(jnp.int32)
    temperature = _loss_temperature(hp, alg)
    old_logp, _ = _policy_outputs(cfg, roles.actor(params, frozen), tokens, resp_index, out.tokens, prefix_len,
                                  temperature)
    ref_logp, _ = _policy_outputs(*roles.ref(frozen), tokens, resp_index, out.tokens, prefix_len, temperature)
    scores = sequence_scores(roles, hp, frozen, tokens, prompt_lengths, out, fn_scores, eos_id=eos_id)
    kl = ppo.kl_penalty(old_logp, ref_logp, hp.kl_estimator) * mask
    reward_kl = kl_coef if alg.kl_in == "reward" else 0.0
    seq_rewards = scores - reward_kl * kl.sum(-1)
    weights = jnp.ones(mask.shape[:1], jnp.float32)
    exp = {"tokens": tokens, "resp_index": resp_index, "resp_tokens": out.tokens, "mask": mask,
           "prefix_len": prefix_len, "old_logprobs": old_logp, "ref_logprobs": ref_logp}
    metrics = {}
    if alg.algorithm in ("ppo", "reinforce_pp"):
        rewards = ppo.token_rewards(scores, kl, mask, reward_kl)
        if alg.critic:
            values = _values(cfg, roles.critic(params, frozen), tokens, resp_index, prefix_len) * mask
            if hp.whiten_rewards:
                rewards = ppo.whiten(rewards, mask, shift_mean=False)
            advantages, returns = ppo.gae(rewards, values, mask, hp.gamma, hp.lam)
            if hp.whiten_advantages:
                advantages = ppo.whiten(advantages, mask)
            exp.update(old_values=values, returns=returns)
        else:
            advantages = algorithms.reinforce_pp_advantages(rewards, mask, hp.gamma)
        seq_rewards = (rewards * mask).sum(-1)
        exp["advantages"] = advantages
    elif alg.policy_gradient:
        if alg.algorithm == "grpo":
            adv = algorithms.group_advantages(seq_rewards, g, alg.scale_rewards)
        elif alg.algorithm == "rloo":
            adv = algorithms.leave_one_out_advantages(seq_rewards, g)
        else:  # remax
            adv = algorithms.baseline_advantages(seq_rewards, baseline, g)
            metrics["baseline_score"] = baseline.mean()
        if alg.filter_ties:
            weights = algorithms.untied_groups(scores, g)
            metrics["untied_fraction"] = weights.mean()
        exp["advantages"] = adv[:, None] * mask
    else:  # best_of_n, online_dpo: keep the chosen rows
        best, worst, differ = algorithms.best_and_worst(scores, g)
        if alg.algorithm == "best_of_n":
            rows, weights = best, jnp.ones(best.shape, jnp.float32)
        else:
            rows = jnp.stack([best, worst], 1).reshape(-1)
            weights = jnp.repeat(differ.astype(jnp.float32), 2)
            metrics["untied_fraction"] = differ.mean()
        metrics["selected_score"] = scores[best].mean()
        exp = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), exp)
    exp["weights"] = weights
    n = mask.sum(-1)
    eos = has_eos(out, eos_id)
    metrics.update({"score": scores.mean(), "kl": kl.sum(-1).mean(), "kl_coef": jnp.asarray(kl_coef, jnp.float32),
                    "reward": seq_rewards.mean(), "response_length": n.mean(), "eos_fraction": eos.mean(),
                    "sampler_logprob_gap": ppo.masked_mean(jnp.abs(out.logprobs - old_logp), mask)})
    finite = jnp.isfinite(seq_rewards).all()
    if "advantages" in exp:  # the supervised methods (best-of-n, online DPO) have none
        finite &= jnp.isfinite(exp["advantages"]).all()
    return exp, metrics, finite


def minibatch_loss(cfg, hp: PPOConfig, params, mb, ptx=None, frozen=None, *, alg: RLConfig = RLConfig(),
                   kl_coef=0.0):
    """The loss of one mini-batch of experience (and an optional pretraining batch); `(loss, metrics)`.

    PPO: clipped surrogate + `vf_coef` x clipped value loss. GRPO, RLOO, ReMax, REINFORCE++: the clipped
    surrogate on their advantages, aggregated by `alg.loss_agg`, plus `kl_coef * k3` with `alg.kl_in="loss"`.
    best_of_n: the LM loss of the selected samples. online_dpo: DPO on (best, worst) row pairs. All: minus
    `ent_coef` x entropy, plus `ptx_coef` x the pretraining loss.
    cfg: a ModelConfig or `Roles`; frozen: the frozen inputs (with adapters, the base they sit on).
    """
    roles = _roles(cfg)
    cfg = roles.cfg
    actor = roles.actor(params, frozen)
    logp, logits = _policy_outputs(cfg, actor, mb["tokens"], mb["resp_index"], mb["resp_tokens"],
                                   mb["prefix_len"], _loss_temperature(hp, alg))
    mask = mb["mask"] * mb["weights"][:, None]
    if alg.policy_gradient:
        loss, pg_m = ppo.policy_loss(logp, mb["old_logprobs"], mb["advantages"], mask, hp.clip,
                                     alg.clip_high or None, alg.loss_agg, hp.response_length)
        metrics = {"policy_loss": loss, **pg_m}
        if roles.has_critic:
            values = _values(cfg, roles.critic(params, frozen), mb["tokens"], mb["resp_index"], mb["prefix_len"])
            vf, vf_m = ppo.value_loss(values, mb["old_values"], mb["returns"], mask, hp.value_clip)
            loss = loss + hp.vf_coef * vf
            metrics.update(value_loss=vf, **vf_m)
        if alg.kl_in == "loss":
            kl = ppo.aggregate(ppo.kl_penalty(logp, mb["ref_logprobs"], "k3"), mask, alg.loss_agg, hp.response_length)
            loss = loss + kl_coef * kl
            metrics["kl_loss"] = kl
    elif alg.algorithm == "best_of_n":
        loss = -ppo.masked_mean(logp, mask)
        metrics = {"nll": loss}
    else:  # online_dpo: rows come in (chosen, rejected) pairs
        def pairs(x):
            return (x * mb["mask"]).sum(-1).reshape(-1, 2)
        pi, ref = pairs(logp), pairs(mb["ref_logprobs"])
        losses, logits_dpo = dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], alg.dpo_beta)
        w = mb["weights"].reshape(-1, 2)[:, 0]
        loss = (losses * w).sum() / jnp.maximum(w.sum(), 1.0)
        metrics = {"dpo_loss": loss, "reward_accuracy": ((logits_dpo > 0) * w).sum() / jnp.maximum(w.sum(), 1.0)}
    ent = ppo.entropy(logits, mb["mask"])
    if hp.ent_coef:
        loss = loss - hp.ent_coef * ent
    metrics["entropy"] = ent
    if ptx is not None:
        ptx_logits = Transformer(cfg).apply({"params": actor}, ptx["inputs"], **model_kwargs(ptx))
        ptx_loss, _ = lm_loss(ptx_logits, ptx["targets"], ptx["loss_mask"])
        loss = loss + hp.ptx_coef * ptx_loss
        metrics["ptx_loss"] = ptx_loss
    metrics["loss"] = loss
    return loss, metrics


def ppo_update(cfg, hp: PPOConfig, tx, state: PPOState, exp, ptx, rng, rewards_finite, frozen=None, *,
               alg: RLConfig = RLConfig()):
    """`hp.epochs` passes over `exp` in `hp.mini_batches` shuffled mini-batches; non-finite updates are skipped.

    Online DPO's rows are shuffled in their (chosen, rejected) pairs. ptx: None, or an LM batch whose rows are
    split into the same number of mini-batches (reused each epoch). Returns `(params, opt_state, n_skipped,
    metrics)` with metrics averaged over all mini-batch updates.
    """
    b = exp["mask"].shape[0]
    k = hp.mini_batches
    unit = 2 if alg.algorithm == "online_dpo" else 1
    if (b // unit) % k:
        raise ValueError(f"ppo: {b // unit} experience {'pairs' if unit == 2 else 'rows'} (rollouts of "
                         f"{alg.algorithm}) are not divisible by mini_batches={k}")
    if ptx is not None:
        n_ptx = jax.tree.leaves(ptx)[0].shape[0]
        if n_ptx % k:
            raise ValueError(f"ppo: ptx batch {n_ptx} is not divisible by mini_batches={k}")
        ptx = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), ptx)
    grad_fn = jax.value_and_grad(
        lambda p, mb, px: minibatch_loss(cfg, hp, p, mb, px, frozen, alg=alg, kl_coef=state.kl_coef), has_aux=True)

    def mb_step(carry, xs):
        params, opt_state, skipped = carry
        idx, i = xs
        mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), exp)
        px = None if ptx is None else jax.tree.map(lambda x: x[i], ptx)
        (loss, metrics), grads = grad_fn(params, mb, px)
        grad_norm = optax.tree.norm(grads)
        ok = rewards_finite & jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(_):
            updates, new_opt = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt

        # As in lm.train_step: lax.cond, not a select that would read and write every parameter twice.
        params, opt_state = jax.lax.cond(ok, update, lambda _: (params, opt_state), None)
        metrics = dict(metrics, grad_norm=grad_norm)
        return (params, opt_state, skipped + (~ok).astype(jnp.int32)), metrics

    def epoch(carry, key):
        units = jax.random.permutation(key, b // unit)
        order = (units[:, None] * unit + jnp.arange(unit)[None, :]).reshape(k, b // k)
        return jax.lax.scan(mb_step, carry, (order, jnp.arange(k)))

    init = (state.params, state.opt_state, jnp.zeros((), jnp.int32))
    (params, opt_state, skipped), metrics = jax.lax.scan(epoch, init, jax.random.split(rng, hp.epochs))
    metrics = jax.tree.map(lambda m: jnp.nanmean(m), metrics)
    return params, opt_state, skipped, metrics


def learn(cfg, hp: PPOConfig, tx, state: PPOState, frozen, prompt_tokens, prompt_lengths,
          out: SampleOutput, ptx=None, *, eos_id: Optional[int], pad_id: int, alg: RLConfig = RLConfig(),
          fn_scores=None, greedy: Optional[SampleOutput] = None, greedy_fn_scores=None):
    """Score one rollout and update the actor (and PPO's critic): `(new_state, metrics)` (pure; jit it).

    cfg: a ModelConfig or `Roles`. prompt_tokens/prompt_lengths: `[P, ...]`, one row per prompt; out: the
    `P * G` samples (`alg.group_size` per prompt, consecutive). fn_scores: a Python reward's scores of `out`.
    greedy (ReMax): the greedy response of each prompt, the baseline, with its `greedy_fn_scores`.
    """
    roles = _roles(cfg)
    rng, update_rng = jax.random.split(state.rng)
    baseline = None
    if alg.algorithm == "remax":
        if greedy is None:
            raise ValueError("rl: algorithm 'remax' needs the greedy responses (the baseline) passed as `greedy`")
        tokens, _ = assemble(prompt_tokens, prompt_lengths, greedy, pad_id)
        baseline = sequence_scores(roles, hp, frozen, tokens, prompt_lengths, greedy, greedy_fn_scores, eos_id=eos_id)
    exp, roll_metrics, finite = make_experience(
        roles, hp, state.params, frozen, expand(prompt_tokens, alg.group_size), expand(prompt_lengths, alg.group_size),
        out, state.kl_coef, eos_id=eos_id, pad_id=pad_id, alg=alg, fn_scores=fn_scores, baseline=baseline)
    params, opt_state, skipped, metrics = ppo_update(roles, hp, tx, state, exp, ptx, update_rng, finite, frozen,
                                                     alg=alg)
    kl_coef = ppo.update_kl_coef(state.kl_coef, roll_metrics["kl"], out.mask.shape[0],
                                 adaptive=hp.adaptive_kl, target=hp.kl_target, horizon=hp.kl_horizon)
    kl_coef = jnp.where(jnp.isfinite(kl_coef), kl_coef, state.kl_coef)
    bad = ((skipped > 0) | ~finite).astype(jnp.int32)
    new_state = PPOState(step=state.step + 1, params=params, opt_state=opt_state, kl_coef=kl_coef, rng=rng,
                         skipped=state.skipped + skipped, bad_streak=(state.bad_streak + 1) * bad)
    metrics = dict(metrics, **roll_metrics, skipped=skipped, skipped_total=new_state.skipped,
                   bad_streak=new_state.bad_streak, rewards_finite=finite.astype(jnp.float32))
    return new_state, metrics


@dataclasses.dataclass
class PPOSteps:
    """The jitted pieces of one RL iteration, built once for a model, recipe, algorithm, optimiser and mesh.

    `rollout(params, frozen, prompt_tokens, prompt_lengths, rng) -> SampleOutput` (params: the state's, of
    which the actor samples; `alg.group_size` samples per prompt, consecutive), `greedy(...)` (ReMax's
    baseline responses) and `learn(state, frozen, prompt_tokens, prompt_lengths, out[, ptx], **extras) ->
    (state, metrics)` (the state is donated; extras: `fn_scores`, `greedy`, `greedy_fn_scores`, see
    `learn`); `iteration` runs them. Arrays are laid out with `state_shardings`; prompts and ptx rows split
    over the batch axes.
    """
    cfg: Roles
    hp: PPOConfig
    alg: RLConfig
    mesh: Mesh
    rules: Any
    rollout_fn: Callable
    greedy_fn: Callable
    learn_fn: Callable  # learn_fn(keys) -> the jitted learn taking those extras, in `EXTRAS` order

    def rollout(self, params, frozen, prompt_tokens, prompt_lengths, rng) -> SampleOutput:
        with jax.set_mesh(self.mesh):
            return self.rollout_fn(params, frozen, prompt_tokens, prompt_lengths, rng)

    def greedy(self, params, frozen, prompt_tokens, prompt_lengths) -> SampleOutput:
        with jax.set_mesh(self.mesh):
            return self.greedy_fn(params, frozen, prompt_tokens, prompt_lengths)

    def learn(self, state, frozen, prompt_tokens, prompt_lengths, out, ptx=None, **extras):
        extras = {k: v for k, v in dict(extras, ptx=ptx).items() if v is not None}
        unknown = set(extras) - set(EXTRAS)
        if unknown:
            raise TypeError(f"PPOSteps.learn: unknown inputs {sorted(unknown)}; expected some of {EXTRAS}")
        keys = tuple(k for k in EXTRAS if k in extras)
        with jax.set_mesh(self.mesh):
            return self.learn_fn(keys)(state, frozen, prompt_tokens, prompt_lengths, out, *(extras[k] for k in keys))

    def iteration(self, state, frozen, prompt_tokens, prompt_lengths, ptx=None, reward_fn=None):
        """One iteration: sample from the current actor, score, learn; returns `(state, metrics, out)`.

        reward_fn: optional `f(prompt_tokens, prompt_lengths, out) -> [rows]` scores (a Python reward over
        decoded text, see rl.stages); called on the samples and, for ReMax, on the greedy responses.
        """
        rng = jax.random.fold_in(state.rng, 1 << 30)  # a stream apart from the update's splits
        out = self.rollout(state.params, frozen, prompt_tokens, prompt_lengths, rng)
        extras = {}
        if reward_fn is not None:
            g = self.alg.group_size
            extras["fn_scores"] = reward_fn(expand(prompt_tokens, g), expand(prompt_lengths, g), out)
        if self.alg.algorithm == "remax":
            extras["greedy"] = self.greedy(state.params, frozen, prompt_tokens, prompt_lengths)
            if reward_fn is not None:
                extras["greedy_fn_scores"] = reward_fn(prompt_tokens, prompt_lengths, extras["greedy"])
        state, metrics = self.learn(state, frozen, prompt_tokens, prompt_lengths, out, ptx, **extras)
        return state, metrics, out


EXTRAS = ("ptx", "fn_scores", "greedy", "greedy_fn_scores")


def make_steps(cfg, hp: PPOConfig, tx, shardings, frozen_shardings, mesh: Mesh, *,
               eos_id: Optional[int], pad_id: int, rules=sharding.RULES, donate: bool = True,
               lr_schedule: Optional[optax.Schedule] = None, alg: RLConfig = RLConfig()) -> PPOSteps:
    """Jit the rollout and learning steps with explicit shardings (see `PPOSteps`); cfg: a ModelConfig or
    `Roles`; alg: the algorithm (default PPO).

    lr_schedule: the optimiser's schedule; `learn` then reports the learning rate after the iteration as `lr`.
    """
    def rows(ndim):
        return sharding.batch_sharding(mesh, ndim, rules)

    replicated = NamedSharding(mesh, P())
    out_sh = SampleOutput(rows(2), rows(2), rows(2), rows(1))
    extra_sh = {"ptx": rows(1), "fn_scores": rows(1), "greedy": out_sh, "greedy_fn_scores": rows(1)}

    def with_rules(fn):
        def traced(*args):
            with nn.logical_axis_rules(rules):
                return fn(*args)
        return traced

    roles = _roles(cfg)
    if roles.has_critic != alg.critic:
        raise ValueError(f"rl: Roles(has_critic={roles.has_critic}) does not match algorithm {alg.algorithm!r}, which "
                         f"{'trains' if alg.critic else 'has no'} critic")

    def do_sample(params, frozen, prompt_tokens, prompt_lengths, rng, temperature):
        return sample(roles.cfg, roles.actor(params, frozen), prompt_tokens, prompt_lengths, rng,
                      max_new_tokens=hp.response_length, temperature=temperature, top_k=0, top_p=1.0,
                      eos_id=eos_id, pad_id=pad_id)

    def do_rollout(params, frozen, prompt_tokens, prompt_lengths, rng):
        g = alg.group_size
        return do_sample(params, frozen, expand(prompt_tokens, g), expand(prompt_lengths, g), rng, hp.temperature)

    def do_greedy(params, frozen, prompt_tokens, prompt_lengths):
        return do_sample(params, frozen, prompt_tokens, prompt_lengths, jax.random.PRNGKey(0), 0.0)

    def learn_fn(keys):
        def do_learn(state, frozen, prompt_tokens, prompt_lengths, out, *values):
            extras = dict(zip(keys, values))
            state, metrics = learn(roles, hp, tx, state, frozen, prompt_tokens, prompt_lengths, out,
                                   extras.pop("ptx", None), eos_id=eos_id, pad_id=pad_id, alg=alg, **extras)
            if lr_schedule is not None:  # optimiser steps taken so far: epochs x mini-batches per iteration
                metrics["lr"] = lr_schedule(state.step * hp.epochs * hp.mini_batches)
            return state, metrics

        if keys not in compiled:
            compiled[keys] = jax.jit(
                with_rules(do_learn),
                in_shardings=(shardings, frozen_shardings, rows(2), rows(1), out_sh) + tuple(extra_sh[k] for k in keys),
                out_shardings=(shardings, None), donate_argnums=(0,) if donate else ())
        return compiled[keys]

    compiled = {}
    rollout_fn = jax.jit(with_rules(do_rollout),
                         in_shardings=(shardings.params, frozen_shardings, rows(2), rows(1), replicated),
                         out_shardings=out_sh)
    greedy_fn = jax.jit(with_rules(do_greedy), in_shardings=(shardings.params, frozen_shardings, rows(2), rows(1)),
                        out_shardings=out_sh)
    return PPOSteps(roles, hp, alg, mesh, rules, rollout_fn, greedy_fn, learn_fn)

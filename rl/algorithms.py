"""The RL algorithms beside PPO as pure functions of arrays: baselines, advantages, loss aggregation, selection.

One trainer (rl.ppo_step, rl.stages.ppo) runs all of them; `RLConfig.algorithm` picks one:
  ppo           a learned critic and GAE (rl.ppo), KL in the reward (InstructGPT; Ouyang et al. 2022).
  grpo          G samples per prompt, advantage = reward minus the group's mean, over its std (Shao et al. 2024,
                DeepSeekMath); `scale_rewards=False` is Dr. GRPO (Liu et al. 2025). KL as a k3 loss term.
  rloo          REINFORCE with the mean of the other G-1 samples as baseline (Ahmadian et al. 2024).
  remax         REINFORCE with the reward of the greedy response as baseline (Li et al. 2023).
  reinforce_pp  REINFORCE++ (Hu 2025): per-token KL in the reward, returns normalised over the whole batch.
  best_of_n     rejection-sampling fine-tuning: the reward model's best of G samples per prompt, trained on
                with the LM loss (Llama 2's rejection sampling, Touvron et al. 2023; RAFT, Dong et al. 2023),
                from the current policy each iteration.
  online_dpo    DPO on the best and worst of G samples from the current policy, judged by the reward model
                (online AI feedback, Guo et al. 2024).

Layout: a rollout batch holds `G = group_size` consecutive rows per prompt (row `p * G + g`); sequence-level
arrays are `[B]` with `B = prompts * G`; token-level ones `[B, T]` with a float `mask`.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from rl import ppo

ALGORITHMS = ("ppo", "grpo", "rloo", "remax", "reinforce_pp", "best_of_n", "online_dpo")
# Samples per prompt when `group_size=0`: GRPO TRL's num_generations 8 (the paper 64); RLOO Ahmadian et al.'s
# k=4; best-of-n 8 (RAFT's K; Llama 2 sampled up to ~10 per prompt); online DPO a pair (Guo et al.).
GROUP_SIZE = {"ppo": 1, "grpo": 8, "rloo": 4, "remax": 1, "reinforce_pp": 1, "best_of_n": 8, "online_dpo": 2}
CRITIC_FREE = tuple(a for a in ALGORITHMS if a != "ppo")
LOSS_AGGREGATIONS = ppo.LOSS_AGGREGATIONS
aggregate = ppo.aggregate


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
    """Which RL algorithm the trainer runs, and the fields of the critic-free ones (configs/ppo.py's `rl` section).

    The sampling, clipping, epochs, mini-batches, KL coefficient and estimator, ptx and non-finite handling
    of every algorithm are the `ppo` section's (rl.ppo_step.PPOConfig). configs/ppo.py gives each method's
    recipe defaults with their sources.

    Attributes:
      algorithm: one of ALGORITHMS (module docstring).
      group_size: G, samples per prompt; `train.batch_size` counts prompts, so an iteration has
        `batch_size * G` rollouts. 0 = the algorithm's default, GROUP_SIZE (PPO 1, GRPO 8, RLOO 4, ...).
      scale_rewards: GRPO divides each group's advantages by its reward std (GRPO, TRL); False is Dr. GRPO.
      loss_agg: how per-token losses become one number: "token_mean" over every token of the batch (PPO,
        DAPO, TRL's default), "seq_mean" the mean of each sequence's token mean (GRPO paper), "seq_sum"
        token sums over `response_length` per sequence (Dr. GRPO's constant normaliser).
      clip_high: upper clip epsilon of the ratio, "clip-higher" (DAPO 0.28); 0 = `ppo.clip` (symmetric).
      kl_in: where the KL to the reference goes: "" = the algorithm's own ("loss" for GRPO, else "reward");
        "reward" (PPO, RLOO, ReMax, REINFORCE++: `-kl_coef * KL` in the reward) or "loss" (GRPO:
        `kl_coef * aggregate(k3)` added to the loss, not in the advantage; always the k3 estimator there, whose
        gradient is the KL's, where k1's is zero in expectation).
      filter_ties: drop groups whose G rewards are all equal from the loss (DAPO's dynamic sampling, as a
        mask: such a group has zero advantage and only dilutes the token mean; the batch is not refilled).
      dpo_beta: online DPO's beta (DPO 0.1).
      reward_fn: optional "module:function", a Python reward over decoded text added to the reward model's
        score (a verifiable reward): `fn(prompts=[str], completions=[str], completion_ids=[[int]]) ->
        [float]`, TRL's reward-function signature. With `reward_from=""` it is the only reward.
    """
    algorithm: str = "ppo"
    group_size: int = 0
    scale_rewards: bool = True
    loss_agg: str = "token_mean"
    clip_high: float = 0.0
    kl_in: str = ""
    filter_ties: bool = False
    dpo_beta: float = 0.1
    reward_fn: str = ""

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"rl.algorithm={self.algorithm!r} is not one of {ALGORITHMS}")
        if self.group_size == 0:  # the algorithm's defaults (frozen dataclass: set once, here)
            object.__setattr__(self, "group_size", GROUP_SIZE[self.algorithm])
        if not self.kl_in:
            object.__setattr__(self, "kl_in", "loss" if self.algorithm == "grpo" else "reward")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"rl.loss_agg={self.loss_agg!r} is not one of {LOSS_AGGREGATIONS}")
        if self.kl_in not in ("reward", "loss"):
            raise ValueError(f"rl.kl_in={self.kl_in!r} must be 'reward' or 'loss'")
        if self.group_size < 1:
            raise ValueError(f"rl.group_size must be >= 1, got {self.group_size}")
        if self.algorithm in ("grpo", "rloo", "best_of_n", "online_dpo") and self.group_size < 2:
            raise ValueError(f"rl.algorithm={self.algorithm} compares samples of one prompt: set rl.group_size >= 2 "
                             f"(got {self.group_size})")
        if self.algorithm == "ppo" and self.group_size != 1:
            raise ValueError("rl.group_size must be 1 with rl.algorithm=ppo (the critic is the baseline)")
        if self.clip_high < 0 or self.dpo_beta <= 0:
            raise ValueError(f"rl.clip_high={self.clip_high} must be >= 0 and rl.dpo_beta={self.dpo_beta} > 0")

    @property
    def critic(self) -> bool:
        return self.algorithm == "ppo"

    @property
    def policy_gradient(self) -> bool:
        """The clipped-ratio objective on advantages (PPO and the REINFORCE family), not a supervised loss."""
        return self.algorithm not in ("best_of_n", "online_dpo")


def _groups(x, group_size: int):
    if x.ndim != 1 or x.shape[0] % group_size:
        raise ValueError(f"rl.algorithms: rewards {tuple(x.shape)} must be [B] with B divisible by the group size "
                         f"{group_size}")
    return jnp.asarray(x, jnp.float32).reshape(-1, group_size)


def _tied(r):
    """`[groups, 1]`: all of a group's rewards are equal (its advantages are exactly 0, not rounding noise)."""
    return r.max(1, keepdims=True) == r.min(1, keepdims=True)


def group_advantages(rewards, group_size: int, scale: bool = True, eps: float = 1e-4):
    """GRPO's advantage of each sample: `(r - mean(group)) / (std(group) + eps)` (`scale=False`: no division,
    Dr. GRPO). The std has Bessel's correction, as TRL's. A group of one, or of equal rewards, gets 0."""
    r = _groups(rewards, group_size)
    centred = jnp.where(_tied(r), 0.0, r - r.mean(1, keepdims=True))
    if scale:
        std = jnp.sqrt(jnp.square(centred).sum(1, keepdims=True) / max(group_size - 1, 1))
        centred = centred / (std + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(rewards, group_size: int):
    """RLOO: `r_i - mean_{j != i} r_j` within each group of G samples; 0 for a group of one (no baseline)."""
    r = _groups(rewards, group_size)
    if group_size == 1:
        return jnp.zeros_like(r).reshape(-1)
    others = (r.sum(1, keepdims=True) - r) / (group_size - 1)
    return jnp.where(_tied(r), 0.0, r - others).reshape(-1)


def baseline_advantages(rewards, baselines, group_size: int):
    """ReMax: `r - b` with one baseline per prompt `baselines: [B / G]` (the greedy response's reward)."""
    r = _groups(rewards, group_size)
    if baselines.shape != r.shape[:1]:
        raise ValueError(f"rl.algorithms.baseline_advantages: baselines {tuple(baselines.shape)} must be "
                         f"[{r.shape[0]}], one per prompt")
    return (r - jnp.asarray(baselines, jnp.float32)[:, None]).reshape(-1)


def reinforce_pp_advantages(token_rewards, mask, gamma: float = 1.0):
    """REINFORCE++: the discounted return of per-token rewards (score on the last token, `-kl_coef * KL` on
    each), normalised to mean 0 and std 1 over every token of the batch (no critic, no per-prompt baseline)."""
    returns, _ = ppo.gae(token_rewards, jnp.zeros_like(token_rewards), mask, gamma, 1.0)
    return ppo.whiten(returns, mask)


def untied_groups(rewards, group_size: int):
    """1.0 for each sample whose group's rewards are not all equal, else 0.0 (DAPO's dynamic-sampling filter)."""
    r = _groups(rewards, group_size)
    untied = (r.max(1) > r.min(1)).astype(jnp.float32)
    return jnp.repeat(untied, group_size)


def best_and_worst(rewards, group_size: int):
    """Row indices `[B / G]` of each group's highest and lowest reward (first on ties), and whether they differ."""
    r = _groups(rewards, group_size)
    base = jnp.arange(r.shape[0]) * group_size
    best, worst = jnp.argmax(r, 1), jnp.argmin(r, 1)
    return base + best, base + worst, r.max(1) > r.min(1)

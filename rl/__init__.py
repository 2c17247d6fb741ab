"""RLHF on top of `lm`: reward modelling (K-wise ranking loss), PPO, DPO and the critic-free RL family.

Public API (`rl.X`, each loaded on first use): `reward` (ranking loss, scoring, `RewardConfig`, `load`),
`ppo` (pure PPO math: GAE, KL estimators, clipped losses, loss aggregation), `algorithms` (GRPO, RLOO, ReMax,
REINFORCE++ advantages, best-of-n and online-DPO selection, `RLConfig`), `ppo_step` (the one RL trainer's
jitted rollout and update steps, `PPOConfig`), `dpo` (DPO losses, `DPOConfig`), `stages` (`reward`, `ppo`
(every `rl.algorithm`), `dpo` as `(config, workdir)` functions run by lm.loop) and `evaluate` (reward-model
accuracy, grading, KL, win rate).
See docs/architecture.md for where a new RL method goes.
"""
from lm import _lazy

_MODULES = ("algorithms", "dpo", "evaluate", "ppo", "ppo_step", "reward", "stages")

__all__ = list(_MODULES)
__getattr__, __dir__ = _lazy.attributes(__name__, {}, _MODULES)

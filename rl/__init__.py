"""RLHF on top of `lm`: reward modelling (K-wise ranking loss), PPO and DPO.

Public API (`rl.X`, each loaded on first use): `reward` (ranking loss, scoring, `RewardConfig`, `load`),
`ppo` (pure PPO math: GAE, KL estimators, clipped losses), `ppo_step` (PPO's jitted rollout and update
steps, `PPOConfig`), `dpo` (DPO losses, `DPOConfig`), `stages` (`reward`, `ppo`, `dpo` as `(config, workdir)`
functions run by lm.loop) and `evaluate` (reward-model accuracy, grading, KL, win rate).
See docs/architecture.md for where a new RL method goes.
"""
from lm import _lazy

_MODULES = ("dpo", "evaluate", "ppo", "ppo_step", "reward", "stages")

__all__ = list(_MODULES)
__getattr__, __dir__ = _lazy.attributes(__name__, {}, _MODULES)

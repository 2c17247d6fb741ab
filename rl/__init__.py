"""RLHF on top of `lm`: reward modelling (K-wise ranking loss), PPO and DPO."""
from rl import dpo, ppo, reward

__all__ = ["dpo", "ppo", "reward"]

"""RLHF with PPO: the SFT policy optimised against the reward model with a per-token KL penalty: rl.stages.ppo.

  python -m experiments.ppo --config=configs/ppo.py:tiny --workdir=runs/ppo \
      --config.init_from=runs/sft --config.reward_from=runs/reward [--config.ppo.ptx_coef=27.8]

Actor and reference come from `init_from` (SFT), the reward model (and by default the critic) from
`reward_from`; prompts from `data.path`. Rerunning the same command resumes from WORKDIR.
"""
import experiments
from rl import stages

if __name__ == "__main__":
    experiments.main(stages.ppo, "configs/ppo.py:tiny")

"""Train a reward model from an SFT run on ranked responses (InstructGPT's K-wise ranking loss): rl.stages.reward.

  python -m experiments.reward --config=configs/reward.py:tiny --workdir=runs/reward \
      --config.init_from=runs/sft [--config.data.path=PREFS.jsonl] [--config.train.steps=N]

The trunk is copied from the SFT run and a new scalar head added; rerunning resumes from WORKDIR. At the
end every training response is scored and the statistics saved (`reward_norm.json`) so that
`rl.reward.load` returns a model whose scores on the SFT policy's responses have mean 0 and std 1.
"""
import experiments
from rl import stages

if __name__ == "__main__":
    experiments.main(stages.reward, "configs/reward.py:tiny")

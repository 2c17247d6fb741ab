"""Train a policy with DPO from an SFT run on ranked responses, against the frozen SFT model: rl.stages.dpo.

  python -m experiments.dpo --config=configs/dpo.py:tiny --workdir=runs/dpo \
      --config.init_from=runs/sft [--config.data.path=PREFS.jsonl] [--config.dpo.beta=0.1]

Every untied pair of a prompt's K responses is a (chosen, rejected) pair; rerunning resumes from WORKDIR.
"""
import experiments
from rl import stages

if __name__ == "__main__":
    experiments.main(stages.dpo, "configs/dpo.py:tiny")

"""Supervised fine-tuning on {prompt, response} JSONL, loss on response tokens only: lm.stages.sft.

  python -m experiments.sft --config=configs/sft.py:tiny --workdir=runs/sft \
      --config.init_from=runs/pretrain [--config.data.path=MY.jsonl] [--config.train.steps=N]

The model config and tokenizer come from the `init_from` run; rerunning resumes from WORKDIR.
"""
import experiments
from lm import stages

if __name__ == "__main__":
    experiments.main(stages.sft, "configs/sft.py:tiny")

"""Pretrain a decoder LM (causal or GLM blank infilling) on plain text: lm.stages.pretrain.

  python -m experiments.pretrain --config=configs/pretrain.py:tiny --workdir=runs/pretrain \
      [--config.train.steps=N] [--config.data.path=MY_TEXT_DIR] [--config.train.log_every=1]

Rerunning the same command resumes from the newest checkpoint in WORKDIR.
"""
import experiments
from lm import stages

if __name__ == "__main__":
    experiments.main(stages.pretrain, "configs/pretrain.py:tiny")

"""Pretrain a decoder LM (causal or GLM blank infilling) on plain text.

  python -m experiments.pretrain --config=configs/pretrain.py:tiny --workdir=runs/pretrain \
      [--config.train.steps=N] [--config.data.path=MY_TEXT_DIR] [--config.train.log_every=1]

Rerunning the same command resumes from the newest checkpoint in WORKDIR.
"""
from absl import flags
from ml_collections import config_flags

import experiments
from lm import data, distributed, losses, trainer
from lm.model import Transformer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and preset, e.g. configs/pretrain.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, tokenizer).", required=True)


def main(argv):
    del argv
    config, workdir = _CONFIG.value, _WORKDIR.value
    distributed.initialize(config.distributed)
    base_model, init_params = experiments.init_from(config)
    model_cfg = experiments.model_config(config, base_model)
    tok = experiments.run_tokenizer(workdir, config.data.tokenizer, config.data.path, config.data.vocab_size)
    experiments.check_vocab(tok, model_cfg)
    experiments.save_config(config, workdir)

    d = config.data
    kw = dict(experiments.data_kwargs(config), objective=d.objective, mask_ratio=d.mask_ratio,
              poisson_lambda=d.poisson_lambda, gmask_prob=d.gmask_prob)
    train_data = data.pretrain_dataset(d.path, tok, split="train", **kw)
    eval_data = data.pretrain_dataset(d.path, tok, split="eval", **kw) if config.train.eval_every else None
    trainer.fit(config, workdir, loss_fn=losses.lm_loss_fn(Transformer(model_cfg)),
                build_params=experiments.build_params(model_cfg), train_data=train_data, eval_data=eval_data,
                meta={"model": model_cfg.to_dict(), "stage": "pretrain", "config": config.to_dict()},
                init_params=init_params)


if __name__ == "__main__":
    experiments.run(main)

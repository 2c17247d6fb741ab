"""Supervised fine-tuning on {prompt, response} JSONL, loss on response tokens only.

  python -m experiments.sft --config=configs/sft.py:tiny --workdir=runs/sft \
      --config.init_from=runs/pretrain [--config.data.path=MY.jsonl] [--config.train.steps=N]

The model config and tokenizer come from the `init_from` run; rerunning resumes from WORKDIR.
"""
import os

from absl import flags, logging
from ml_collections import config_flags

import experiments
from lm import data, distributed, losses, trainer
from lm.model import Transformer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and preset, e.g. configs/sft.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, tokenizer).", required=True)


def main(argv):
    del argv
    config, workdir = _CONFIG.value, _WORKDIR.value
    distributed.initialize(config.distributed)
    base_model, init_params = experiments.init_from(config)
    if init_params is None:
        logging.warning("config.init_from is empty: fine-tuning a randomly initialised %s", config.model.preset)
    model_cfg = experiments.model_config(config, base_model)
    source = config.data.tokenizer
    if not source and config.init_from:
        source = os.path.join(os.path.dirname(experiments.checkpoint_dir(config.init_from).rstrip("/")),
                              "tokenizer.model")
    tok = experiments.run_tokenizer(workdir, source)
    experiments.check_vocab(tok, model_cfg)
    experiments.save_config(config, workdir)

    d = config.data
    kw = dict(experiments.data_kwargs(config), pack=d.pack, overlong=d.overlong)
    train_data = data.sft_dataset(d.path, tok, split="train", **kw)
    eval_data = data.sft_dataset(d.path, tok, split="eval", **kw) if config.train.eval_every else None
    trainer.fit(config, workdir, loss_fn=losses.lm_loss_fn(Transformer(model_cfg)),
                build_params=experiments.build_params(model_cfg), train_data=train_data, eval_data=eval_data,
                meta={"model": model_cfg.to_dict(), "stage": "sft", "config": config.to_dict()},
                init_params=init_params)


if __name__ == "__main__":
    experiments.run(main)

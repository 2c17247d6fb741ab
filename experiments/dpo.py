"""Train a policy with DPO from an SFT run on ranked responses, against the frozen SFT model as reference.

  python -m experiments.dpo --config=configs/dpo.py:tiny --workdir=runs/dpo \
      --config.init_from=runs/sft [--config.data.path=PREFS.jsonl] [--config.dpo.beta=0.1]

Every untied pair of a prompt's K responses is a (chosen, rejected) pair; rerunning resumes from WORKDIR.
"""
from absl import flags
from ml_collections import config_flags

import experiments
from lm import checkpoint, data, distributed, trainer
from rl import dpo, reward

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and preset, e.g. configs/dpo.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, tokenizer).", required=True)


def main(argv):
    del argv
    config, workdir = _CONFIG.value, _WORKDIR.value
    distributed.initialize(config.distributed)
    model_cfg, init_params, sft_ckpt, tok = experiments.start_from_sft(config, workdir,
                                                                       "(policy start and reference)")
    mesh, rules = trainer.mesh_and_rules(config)
    ref = checkpoint.load_params(sft_ckpt, reward.abstract_params(model_cfg, "lm", mesh, rules))

    d = config.data
    kw = dict(experiments.data_kwargs(config), k=d.k, overlong=d.overlong)

    def dataset(split):
        return dpo.with_reference_logps(data.preference_dataset(d.path, tok, split=split, **kw), model_cfg, ref,
                                        mesh, rules)

    trainer.fit(config, workdir, loss_fn=dpo.dpo_loss_fn(model_cfg, config.dpo.beta, config.dpo.label_smoothing),
                build_params=experiments.build_params(model_cfg), train_data=dataset("train"),
                eval_data=dataset("eval") if config.train.eval_every else None, init_params=init_params,
                meta={"model": model_cfg.to_dict(), "stage": "dpo", "config": config.to_dict()})


if __name__ == "__main__":
    experiments.run(main)

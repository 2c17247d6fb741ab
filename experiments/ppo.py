"""RLHF with PPO: the SFT policy optimised against the reward model with a per-token KL penalty.

  python -m experiments.ppo --config=configs/ppo.py:tiny --workdir=runs/ppo \
      --config.init_from=runs/sft --config.reward_from=runs/reward [--config.ppo.ptx_coef=27.8]

Actor and reference come from `init_from` (SFT), the reward model (and by default the critic) from
`reward_from`; prompts from `data.path`. Rerunning the same command resumes from WORKDIR.
"""

import jax
from absl import flags
from ml_collections import config_flags

import experiments
from lm import data, distributed
from rl import ppo_loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and preset, e.g. configs/ppo.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, tokenizer).", required=True)


def main(argv):
    del argv
    config, workdir = _CONFIG.value, _WORKDIR.value
    distributed.initialize(config.distributed)
    if not config.init_from or not config.reward_from:
        raise ValueError("config.init_from (the SFT run) and config.reward_from (the reward run) are both required")
    model_cfg, _, _, tok = experiments.start_from_sft(config, workdir, "(actor and reference)")

    ptx = None
    if config.ppo.ptx_coef > 0:
        p = config.ptx
        n = jax.process_count()
        if p.batch_size % n:
            raise ValueError(f"ptx.batch_size={p.batch_size} is not divisible by the {n} processes")
        ptx = data.pretrain_dataset(p.path, tok, seq_len=p.seq_len, batch_size=p.batch_size // n, seed=config.seed,
                                    objective=p.objective, cache_dir=p.cache_dir or None,
                                    process_index=jax.process_index(), process_count=n)
    ppo_loop.train(config, workdir, model_cfg=model_cfg, tokenizer=tok, sft_dir=config.init_from,
                   reward_dir=config.reward_from, ptx_data=ptx,
                   meta={"model": model_cfg.to_dict(), "config": config.to_dict()})


if __name__ == "__main__":
    experiments.run(main)

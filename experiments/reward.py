"""Train a reward model from an SFT run on ranked responses (InstructGPT's K-wise ranking loss).

  python -m experiments.reward --config=configs/reward.py:tiny --workdir=runs/reward \
      --config.init_from=runs/sft [--config.data.path=PREFS.jsonl] [--config.train.steps=N]

The trunk is copied from the SFT run and a new scalar head added; rerunning resumes from WORKDIR. At the
end the scores of the training responses are measured and saved (`reward_norm.json`) so that
`rl.reward.load` returns a model whose scores on the SFT policy's responses have mean 0 and std 1.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags, logging
from ml_collections import config_flags

import experiments
from lm import checkpoint, data, distributed, sharding, trainer
from rl import reward

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and preset, e.g. configs/reward.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, tokenizer).", required=True)


def score_statistics(model_cfg, params, batches, mesh, rules):
    """`(mean, std, count)` of the scores of every present response in `batches` (global over processes)."""
    @jax.jit
    def sums(p, b):
        with nn.logical_axis_rules(rules):
            s = reward.score_responses(model_cfg, p, b["tokens"], b["last_index"], b["prompt_len"])
        w = (b["ranks"] >= 0).astype(jnp.float32)
        return jnp.stack([w.sum(), (s * w).sum(), (s * s * w).sum()])

    total = jnp.zeros(3)
    with jax.set_mesh(mesh):
        for b in batches:
            keys = ("tokens", "last_index", "prompt_len", "ranks")
            total = total + sums(params, sharding.global_batch({k: b[k] for k in keys}, mesh, rules))
    n, s, ss = (float(x) for x in jax.device_get(total))
    mean = s / max(n, 1.0)
    return mean, max(ss / max(n, 1.0) - mean * mean, 0.0) ** 0.5, int(n)


def main(argv):
    del argv
    config, workdir = _CONFIG.value, _WORKDIR.value
    distributed.initialize(config.distributed)
    model_cfg, _, sft_ckpt, tok = experiments.start_from_sft(config, workdir, "the reward model starts from")
    mesh, rules = trainer.mesh_and_rules(config)

    def init_params(abstract):
        sft = checkpoint.load_params(sft_ckpt, reward.abstract_params(model_cfg, "lm", mesh, rules))
        params = reward.init_from_sft(model_cfg, sft, jax.random.PRNGKey(config.seed), config.reward.head_init)
        return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params, abstract)

    d = config.data
    kw = dict(experiments.data_kwargs(config), k=d.k, overlong=d.overlong)
    train_data = data.preference_dataset(d.path, tok, split="train", **kw)
    eval_data = data.preference_dataset(d.path, tok, split="eval", **kw) if config.train.eval_every else None
    state = trainer.fit(config, workdir, loss_fn=reward.reward_loss_fn(model_cfg),
                        build_params=experiments.build_params(model_cfg, head="scalar"), train_data=train_data,
                        eval_data=eval_data, init_params=init_params,
                        meta={"model": model_cfg.to_dict(), "stage": "reward", "head": "scalar",
                              "config": config.to_dict()})
    n_batches = config.reward.normalize_batches
    if n_batches:
        batches = iter(data.preference_dataset(d.path, tok, split="train", **dict(kw, seed=config.seed + 1)))
        mean, std, n = score_statistics(model_cfg, state.params, (next(batches) for _ in range(n_batches)), mesh,
                                        rules)
        if distributed.is_primary():
            path = reward.save_normalization(workdir, mean, std, n)
            logging.info("reward scores of %d training responses: mean %.4f, std %.4f (saved to %s)", n, mean,
                         std, path)


if __name__ == "__main__":
    experiments.run(main)

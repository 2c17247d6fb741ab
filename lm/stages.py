"""The language-model stages as library functions `(config, workdir) -> workdir`: pretraining and SFT.

Each one reads its config (configs/pretrain.py, configs/sft.py), starts from `config.init_from` when set,
trains through lm.loop (resuming from `workdir`) and leaves a run directory the next stage can start from.
Their launchers (`python -m experiments.pretrain`, `experiments.sft`) and the pipeline call these. The RL
stages (reward model, PPO, DPO) are in rl.stages.
"""
from __future__ import annotations

import functools

from absl import logging

from lm import data, losses, peft, runs
from lm.loop import fit, mesh_and_rules
from lm.model import Transformer


def _fit_lm(config, workdir: str, stage: str, model_cfg, init_params, train_data, eval_data) -> str:
    """Train the LM (full, or adapters on a frozen base with `config.peft`) through lm.loop.fit."""
    model_cfg, frozen = runs.adapt(config, model_cfg, init_params, "lm", *mesh_and_rules(config))
    fit(config, workdir, loss_fn=losses.lm_loss_fn(Transformer(model_cfg)),
        build_params=functools.partial(peft.boxed_trainable, model_cfg), train_data=train_data, eval_data=eval_data,
        init_params=init_params if frozen is None else None, frozen=frozen,
        meta=runs.run_meta(config, model_cfg, stage, head="lm"))
    return workdir


def pretrain(config, workdir: str) -> str:
    """Pretrain a decoder LM (causal or GLM blank infilling, `data.objective`) on the text under `data.path`.

    Without `data.tokenizer` a tokenizer of `data.vocab_size` pieces is trained on that text first.
    """
    d = config.data
    model_cfg, init_params, tok = runs.start(config, workdir, train_on=d.path, vocab_size=d.vocab_size)
    kw = dict(runs.data_kwargs(config), objective=d.objective, mask_ratio=d.mask_ratio,
              poisson_lambda=d.poisson_lambda, gmask_prob=d.gmask_prob)
    eval_data = data.pretrain_dataset(d.path, tok, split="eval", **kw) if config.train.eval_every else None
    return _fit_lm(config, workdir, "pretrain", model_cfg, init_params,
                   data.pretrain_dataset(d.path, tok, split="train", **kw), eval_data)


def sft(config, workdir: str) -> str:
    """Supervised fine-tuning on the SFT rows under `data.path` (any format and schema of lm.data.builders,
    multi-turn included), in the tokenizer's chat template, the loss on every assistant reply."""
    d = config.data
    model_cfg, init_params, tok = runs.start(config, workdir)
    data.chat.stop_id(tok)  # fails now, not after training, for a template whose replies could never end
    if init_params is None:
        logging.warning("config.init_from is empty: fine-tuning a randomly initialised %s", config.model.preset)
    if d.pack and config.peft.method in ("prompt", "prefix"):
        raise ValueError(f"peft.method={config.peft.method!r} puts virtual tokens before every row, which packed "
                         "rows cannot take: set data.pack=False")
    kw = dict(runs.data_kwargs(config), pack=d.pack, overlong=d.overlong, field_map=d.field_map)
    eval_data = data.sft_dataset(d.path, tok, split="eval", **kw) if config.train.eval_every else None
    return _fit_lm(config, workdir, "sft", model_cfg, init_params, data.sft_dataset(d.path, tok, split="train", **kw),
                   eval_data)

"""The language-model stages as library functions `(config, workdir) -> workdir`: pretraining, SFT and
classification fine-tuning.

Each one reads its config (configs/pretrain.py, configs/sft.py, configs/classify.py), starts from
`config.init_from` when set, trains through lm.loop (resuming from `workdir`) and leaves a run directory the next
stage (or `lm.load`, `experiments.export`) can start from. Their launchers (`python -m experiments.pretrain`,
`experiments.sft`, `experiments.classify`) and the pipeline call these. The RL stages (reward model, PPO, DPO)
are in rl.stages.
"""
from __future__ import annotations

import functools
import os

import jax
from absl import logging

from lm import classify as classify_lib
from lm import data, losses, peft, runs
from lm.data import builders, schemas
from lm.loop import fit, mesh_and_rules
from lm.model import Transformer, abstract_params, with_score_head


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


def _class_names(config, sources: dict, workdir: str) -> list[str]:
    """The run's class names (`schemas.label_names` over every row of `sources`, {split: data source}): a resumed
    run keeps those of its checkpoint, which `data.labels`, when set, must equal."""
    given = list(config.data.labels)
    ckpt = os.path.join(workdir, "checkpoints")
    saved = runs.load_meta(ckpt).get("labels") if runs.latest_step(ckpt) is not None else None
    if saved is not None and given and given != saved:
        raise ValueError(f"data.labels {given} differs from the classes {saved} the run in {workdir} trained with")
    rows = ((src[i]["source"].decode("utf-8"), schemas.decode_label(src[i]["label"]))  # tfds gives bytes
            for src in sources.values() for i in range(len(src)))
    names = schemas.label_names(rows, saved or given)
    if len(names) < 2:
        raise ValueError(f"{config.data.path} holds one class {names}: a classifier needs two or more")
    return names


def classify(config, workdir: str) -> str:
    """GPT-1's classification fine-tuning (section 3.3) of the `init_from` language model on labelled texts or
    text pairs under `data.path` (lm.data.classify_dataset): a new linear `score` head of one output per class
    on the last token's final hidden state, softmax cross-entropy, plus `classify.aux_lm_coef` times the LM
    loss on the text (lm.classify). Held out: `data.eval_path`, else `data.eval_fraction` of `data.path`;
    each evaluation is one pass over it (up to `train.eval_batches` batches), its `eval_accuracy` the share of
    rows whose label has the largest logit. The class names are saved with every checkpoint (`labels`,
    lm.runs.labels) and exported as `id2label` (experiments.export). With `config.peft` the head trains beside
    the adapters.
    """
    hp = runs.recipe(classify_lib.ClassifyConfig, config.classify, "classify")
    d = config.data
    model_cfg, init_params, tok = runs.start(config, workdir)
    if init_params is None:
        logging.warning("config.init_from is empty: fine-tuning a randomly initialised %s", config.model.preset)
    kw = dict(runs.data_kwargs(config), overlong=d.overlong, field_map=d.field_map)
    # {split: (file, the builder split read)}: with a separate eval file, each file is read whole
    files = {"train": (d.path, "train"), "eval": (d.eval_path, "train") if d.eval_path else (d.path, "eval")}
    if d.eval_path:
        kw["eval_fraction"] = 0.0
    if not config.train.eval_every:
        del files["eval"]
    sources = {split: builders.data_source("classify", path, part, cache_dir=kw["cache_dir"],
                                           eval_fraction=kw["eval_fraction"], field_map=d.field_map)
               for split, (path, part) in files.items()}
    labels = _class_names(config, sources, workdir)
    model_cfg = model_cfg.replace(num_labels=len(labels))
    mesh, rules = mesh_and_rules(config)
    model_cfg, frozen = runs.adapt(config, model_cfg, init_params, hp.head, mesh, rules)

    def init(abstract):
        lm_params = init_params(abstract_params(model_cfg, "lm", mesh, rules))
        params = with_score_head(model_cfg, lm_params, jax.random.PRNGKey(config.seed), hp.head)
        return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params, abstract)

    def dataset(split, **extra):
        path, part = files[split]
        return data.classify_dataset(path, tok, labels=labels, split=part, **dict(kw, **extra))

    eval_data = None
    if config.train.eval_every:
        eval_data = dataset("eval", num_epochs=1)
        rows = -(-len(sources["eval"]) // jax.process_count())
        if config.train.eval_batches * kw["batch_size"] < rows:
            logging.warning("train.eval_batches=%d batches of %d cover part of the %d held-out rows per process",
                            config.train.eval_batches, kw["batch_size"], rows)
    # With adapters, `init` is not used: the score head is a fresh `normal` one beside fresh adapters.
    fit(config, workdir, loss_fn=classify_lib.classify_loss_fn(model_cfg, hp.aux_lm_coef),
        build_params=functools.partial(peft.boxed_trainable, model_cfg, head=hp.head), train_data=dataset("train"),
        eval_data=eval_data, init_params=init if frozen is None and init_params is not None else None,
        frozen=frozen, meta=runs.run_meta(config, model_cfg, "classify", head=hp.head, labels=labels))
    return workdir

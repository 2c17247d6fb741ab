"""Run directories: what a stage reads from the run it starts from, what it leaves for the next, and `load`.

A run directory is self-contained: `config.json` (the resolved run config), its tokenizer (`tokenizer.model`, or
the files of a checkpoint's tokenizer: `tokenizer.json`, `tokenizer_config.json`, ...),
`metrics.jsonl`, `tensorboard/` and `checkpoints/`, whose metadata holds the model config (`model`) and
which parameters are the policy (`head`, or for runs that train several models `params`/`policy`, e.g. a PPO
run's `{"actor": "lm", "critic": "scalar"}` with policy `actor`). `load` turns any of them, or a Hugging Face
directory, into `(ModelConfig, params, tokenizer)`.

A parameter-efficient run (`config.peft`, lm.peft) checkpoints its trainable leaves only; its metadata names
the run or Hugging Face directory it adapted (`base`), which `load` reads again and merges the adapters into.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Optional

import jax
from absl import logging

from lm import checkpoint, distributed, peft, presets, sharding, tokenizers
from lm.config import ModelConfig
from lm.model import abstract_params, scalar_params
from lm.tokenizer import Tokenizer

TOKENIZER = tokenizers.SP_MODEL  # a run's own (project) tokenizer


def checkpoint_dir(path: str) -> str:
    """The checkpoint directory of `path`, which may be a run directory or its `checkpoints/` itself."""
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def run_dir(path: str) -> str:
    """The run directory of `path` (a run directory or its `checkpoints/`)."""
    path = os.path.abspath(path)
    return path if os.path.isdir(os.path.join(path, "checkpoints")) else os.path.dirname(path)


def home(path: str) -> str:
    """Where the own files (tokenizer, `reward_norm.json`) of a run directory (or its `checkpoints/`) or of a
    Hugging Face directory are."""
    return path if is_hf_dir(path) else run_dir(checkpoint_dir(path))


def has_tokenizer(directory: str) -> bool:
    """Whether `directory` holds a tokenizer (`tokenizer.model` or `tokenizer.json`)."""
    return any(os.path.isfile(os.path.join(directory, n)) for n in (TOKENIZER, tokenizers.TOKENIZER_JSON))


def latest_step(path: str) -> Optional[int]:
    """The newest committed checkpoint step of a run directory (or its `checkpoints/`), None if none."""
    return checkpoint.latest_step(checkpoint_dir(path))


def recipe(cls, section, name: str):
    """The recipe dataclass `cls` (e.g. rl.ppo_step.PPOConfig) from its config section; an unknown key is an
    error naming it (configs build those sections from the same dataclass: configs.common.from_dataclass)."""
    values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"config section {name!r} has unknown field(s) {sorted(unknown)} for {cls.__name__}")
    return cls(**values)


def model_config(config, base: Optional[dict] = None) -> ModelConfig:
    """`config.model.preset` with the non-None `config.model.overrides`; or, when `base` (a saved ModelConfig
    dict, e.g. of the `init_from` run) is given, that model with the overrides that only change how it runs.

    An override that changes what the saved model computes (e.g. `position`) is an error naming the field.
    """
    overrides = {k: v for k, v in config.model.overrides.to_dict().items() if v is not None}
    if base is None:
        return presets.get(config.model.preset, **overrides)
    saved = ModelConfig.from_dict(base)
    saved.check_same_model(saved.replace(**overrides), f"the init_from run {config.init_from}")
    return saved.replace(**overrides)


def init_from(config):
    """`(model_config_dict, init_params)` of `config.init_from` (None, None when it is empty).

    init_params maps the abstract params of a policy (language-model head, with shardings) to the newest
    saved policy of a run (the params of an LM run, the actor of a PPO run; a reward model is refused), or
    to the weights of a Hugging Face directory (read on the host once, then placed as the abstract says).
    """
    if not config.init_from:
        return None, None
    if is_hf_dir(config.init_from):
        from lm import hf

        if hf.head_of(config.init_from) != "lm":
            raise ValueError(f"init_from {config.init_from} is a reward model (*ForSequenceClassification); this "
                             "stage starts from a language model")
        # Trained in float32 whatever the checkpoint stores (bf16 updates of a small learning rate round away);
        # model.overrides (e.g. param_dtype) apply on top.
        cfg = hf.load_config(config.init_from, dtype="float32")

        def init_hf(abstract):  # read when called, so no host copy outlives the placement
            _, params = hf.load(config.init_from, dtype="float32")
            return jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding), params, abstract)

        return cfg.to_dict(), init_hf
    meta = load_meta(config.init_from)
    cfg = ModelConfig.from_dict(meta["model"])
    if peft.enabled(cfg):  # an adapted run: its base with the adapters merged in
        def init_adapted(abstract):
            mesh = getattr(jax.tree.leaves(abstract)[0].sharding, "mesh", None)
            _, params, _ = load(config.init_from, mesh=mesh, head="lm")
            return jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding), params, abstract)

        return peft.merged_config(cfg).to_dict(), init_adapted

    def init_params(abstract):
        mesh = getattr(jax.tree.leaves(abstract)[0].sharding, "mesh", None)
        return _read_policy(config.init_from, meta, "lm",
                            lambda h: abstract if h == "lm" else abstract_params(cfg, h, mesh))

    return meta["model"], init_params


def adapt(config, model_cfg: ModelConfig, init_params, head: str, mesh, rules) -> tuple[ModelConfig, object]:
    """`(cfg, frozen)`: the stage's model with `config.peft`'s adapters, and for a parameter-efficient run its
    frozen base (lm.peft.Frozen, from `init_params`, the `init_from` loader); `frozen` is None for full
    fine-tuning."""
    pc = recipe(peft.PeftConfig, config.peft, "peft")
    cfg = peft.adapt(model_cfg, pc)
    if not peft.enabled(cfg):
        return cfg, None
    if init_params is None:
        raise ValueError(f"peft.method={pc.method!r} adapts a trained model: set config.init_from")
    return cfg, peft.frozen_base(cfg, init_params, head, mesh, rules)


def check_vocab(tokenizer, model_cfg: ModelConfig) -> None:
    """Every token id must have an embedding row."""
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model_cfg.vocab_size}; set --config.model.overrides.vocab_size={tokenizer.vocab_size}")


def text_files(path: str, name: str = "data.path") -> list[str]:
    """`path` itself, or the `.txt` files under a directory (recursively, sorted); errors call it `name`."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
        if not files:
            raise FileNotFoundError(f"{name} {path} holds no .txt files")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} {path} does not exist")
    return [path]


TOKENIZER_FILES = (tokenizers.TOKENIZER_JSON, tokenizers.SP_MODEL, tokenizers.CONFIG, tokenizers.SPECIAL_MAP,
                   tokenizers.TEMPLATE_FILE)  # what a run directory keeps of its tokenizer


def _copy_tokenizer(source: str, workdir: str) -> None:
    """Make the tokenizer at `source` (any path `lm.tokenizers.load` reads) the one of `workdir`: the files it
    was loaded from replace whatever tokenizer files were there."""
    tok = tokenizers.load(source)
    if os.path.isfile(source) or isinstance(tok, tokenizers.ProjectTokenizer):
        files = {tok.path: TOKENIZER}  # a `.model` file is read alone (lm.tokenizers.load)
    else:
        files = {os.path.join(source, n): n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))}
        if isinstance(tok, tokenizers.SentencePieceTokenizer):
            files.pop(os.path.join(source, tokenizers.TOKENIZER_JSON), None)  # not the one it was loaded from
    staged = {name: open(src, "rb").read() for src, name in files.items()}  # source may be workdir itself
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(workdir, name)):
            os.remove(os.path.join(workdir, name))
    for name, content in staged.items():
        with open(os.path.join(workdir, name), "wb") as f:
            f.write(content)


def run_tokenizer(workdir: str, source: str = "", train_on: Optional[str] = None, vocab_size: int = 0,
                  chat_template: str = ""):
    """The run's tokenizer, kept in `workdir` (`tokenizer.model`, or a checkpoint's tokenizer files).

    Copied from `source` (a `.model` file, a Hugging Face or run directory) when given; otherwise, unless the
    run already has one, trained on the text under `train_on` with `vocab_size` ids (by process 0; the others
    wait). `chat_template` (a Jinja file, or "chatml"), when given, replaces the tokenizer's chat template
    and is kept as `WORKDIR/chat_template.jinja`, so later stages use it too.
    """
    target = os.path.join(workdir, TOKENIZER)
    if distributed.is_primary():
        os.makedirs(workdir, exist_ok=True)
        if source:
            _copy_tokenizer(source, workdir)
        elif not has_tokenizer(workdir):
            if train_on is None:
                raise ValueError("no tokenizer: set data.tokenizer (or init_from a run or Hugging Face directory "
                                 "that has one)")
            logging.info("training a %d-piece tokenizer on %s", vocab_size, train_on)
            Tokenizer.train(text_files(train_on), vocab_size, target[:-len(".model")])
        if chat_template:
            if isinstance(tokenizers.load(workdir), tokenizers.ProjectTokenizer):
                raise ValueError(f"data.chat_template={chat_template!r}: the project tokenizer has its own chat "
                                 "format (lm.data.chat); a template applies to a checkpoint's tokenizer")
            with open(os.path.join(workdir, tokenizers.TEMPLATE_FILE), "w", encoding="utf-8") as f:
                f.write(tokenizers.chat_template_source(chat_template))
    distributed.barrier("tokenizer")
    return tokenizers.load(workdir)


def save_config(config, workdir: str) -> None:
    """Write the resolved config to `WORKDIR/config.json` (process 0)."""
    if distributed.is_primary():
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1, default=str)


def start(config, workdir: str, *, needs: str = "", train_on: Optional[str] = None, vocab_size: int = 0):
    """The common start of a stage: `(model config, init_params, tokenizer)`, config saved in `workdir`.

    The model is `config.init_from`'s (with runtime overrides) or the preset's; the tokenizer is
    `config.data.tokenizer`, else the `init_from` run's or Hugging Face directory's, else (pretraining) one
    trained on `train_on`; it is kept in `WORKDIR` (`run_tokenizer`), with `data.chat_template` if set.
    `needs`, when given, makes `init_from` required and completes the error.
    """
    if needs and not config.init_from:
        raise ValueError(f"config.init_from must name the run {needs}")
    base_model, init_params = init_from(config)
    model_cfg = model_config(config, base_model)
    source = config.data.tokenizer
    if not source and config.init_from:
        source = home(config.init_from)
        if not has_tokenizer(source):
            raise FileNotFoundError(f"init_from {config.init_from} holds no tokenizer ({tokenizers.TOKENIZER_JSON} or "
                                    f"{TOKENIZER}); set data.tokenizer to the model's tokenizer")
    tok = run_tokenizer(workdir, source, train_on, vocab_size, config.data.get("chat_template", ""))
    check_vocab(tok, model_cfg)
    save_config(config, workdir)
    return model_cfg, init_params, tok


def local_batch_size(config, batch_size: Optional[int] = None, name: str = "train.batch_size") -> int:
    """Rows of each global batch (default `config.train.batch_size`) that this process loads."""
    batch_size = config.train.batch_size if batch_size is None else batch_size
    n = jax.process_count()
    if batch_size % n:
        raise ValueError(f"{name}={batch_size} is not divisible by the {n} processes")
    return batch_size // n


def data_kwargs(config) -> dict:
    """Arguments every lm.data pipeline takes, from the config and this process's place in the run."""
    return dict(seq_len=config.data.seq_len, batch_size=local_batch_size(config), seed=config.seed,
                process_index=jax.process_index(), process_count=jax.process_count(),
                cache_dir=config.data.cache_dir or None, eval_fraction=config.data.eval_fraction)


def is_hf_dir(path: str) -> bool:
    """True when `path` holds a Hugging Face checkpoint: a config.json naming its architecture or model type
    (a run directory's config.json is the run config)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("architectures" in config or "model_type" in config)


def load_meta(path: str) -> dict:
    """The checkpoint metadata of a run directory (or its `checkpoints/`): model config, heads, stage."""
    ckpt = checkpoint_dir(path)
    meta = checkpoint.load_meta(ckpt)
    if "model" not in meta:
        raise ValueError(f"checkpoint {ckpt} has no model config in its metadata (key 'model')")
    return meta


def run_meta(config, model_cfg: ModelConfig, stage: str, **layout) -> dict:
    """The metadata a stage saves with its checkpoints: the model, the stage, the run config and which params
    are the policy (`head="lm"`, or `params={name: head}` with `policy=name` for runs of several models); for
    a model with adapters, the run or directory they adapt (`base`, the absolute `init_from`)."""
    meta = {"model": model_cfg.to_dict(), "stage": stage, "config": config.to_dict(), **layout}
    if peft.enabled(model_cfg):
        meta["base"] = os.path.abspath(config.init_from)
    return meta


def _layout(path: str, meta: dict) -> tuple[dict, str]:
    """`({sub-model: head}, policy)` of a checkpoint; `{"": head}, ""` when the params are one model."""
    if "params" in meta:
        if meta.get("policy") not in meta["params"]:
            raise ValueError(f"checkpoint of {path}: metadata 'policy' {meta.get('policy')!r} names none of "
                             f"its models {sorted(meta['params'])}")
        return meta["params"], meta["policy"]
    if meta.get("stage") == "ppo":  # written before PPO checkpoints named their models
        raise ValueError(f"{path} is a PPO run from an older layout (no 'params' in its metadata); rerun PPO")
    return {"": meta.get("head", "lm")}, ""


_HELD = {"scalar": "a reward model or classifier",
         "lm+scalar": "a reward model or classifier with its language-model head"}


def _read_policy(path: str, meta: dict, head: Optional[str], target):
    """The policy's params of a run, each sub-model restored as `target(head)` says; checks `head`."""
    layout, policy = _layout(path, meta)
    held = layout[policy]
    if head is not None and held != head and not _scalar_of(head, held):
        raise ValueError(f"{path} holds a model with a {held!r} head, not the {head!r} head asked for "
                         f"({_HELD.get(held, 'a policy')})")
    abstract = target(held) if policy == "" else {k: target(h) for k, h in layout.items()}
    params = checkpoint.load_params(checkpoint_dir(path), abstract)
    params = params if policy == "" else params[policy]
    return scalar_params(params) if _scalar_of(head, held) else params


def _scalar_of(head: Optional[str], held: str) -> bool:
    """Whether the scalar model asked for is the one held without its language-model head: a reward model or
    classifier trained with an auxiliary LM loss ("lm+scalar") serves as "scalar"."""
    return head == "scalar" and held == "lm+scalar"


def load_adapted(path: str, *, head: Optional[str] = None, mesh=None, rules=None):
    """`(cfg, base, trainable)` of a parameter-efficient run: its model config (adapters on), the float params
    of the model it adapted (`base` in its metadata, read again; a scalar-head run's without `lm_head`) and
    the policy's trainable leaves of its newest checkpoint."""
    return _adapted(path, load_meta(path), head, mesh, rules)


def _adapted(path: str, meta: dict, head: Optional[str], mesh, rules):
    """`load_adapted` of a run whose checkpoint metadata `meta` is already read."""
    saved = ModelConfig.from_dict(meta["model"])
    if not peft.enabled(saved):
        raise ValueError(f"{path} trained the whole model (no adapters in its model config)")
    if "base" not in meta:
        raise ValueError(f"{path}: a run with adapters whose checkpoint metadata names no 'base' model")
    if not os.path.isdir(meta["base"]):
        raise FileNotFoundError(f"{path} adapts {meta['base']}, which is gone; its adapters need that model")
    # The base is the language model the run started from: a classifier's num_labels is its new head's.
    base_cfg = peft.plain_config(saved).replace(num_labels=1)
    _, base, _ = load(meta["base"], mesh=mesh, rules=rules, head="lm", cfg=base_cfg)
    layout, policy = _layout(path, meta)
    if layout[policy] == "scalar" or _scalar_of(head, layout[policy]):
        base = scalar_params(base)
    return saved, base, read_trainable(path, saved, meta, head, mesh, rules)


def read_trainable(path: str, saved: ModelConfig, meta: dict, head: Optional[str], mesh=None, rules=None):
    """The policy's trainable leaves (adapters, and a scalar model's head) of a parameter-efficient run with
    model config `saved` and checkpoint metadata `meta`, laid out on `mesh`; the base is not read."""
    rules = sharding.RULES if rules is None else rules
    return _read_policy(path, meta, head, lambda h: peft.split(abstract_params(saved, h, mesh, rules), h)[1])


def load(path: str, *, mesh=None, rules=None, head: Optional[str] = None, cfg: Optional[ModelConfig] = None,
         tokenizer: Optional[str] = None) -> tuple[ModelConfig, dict, Optional[tokenizers.TokenizerLike]]:
    """`(ModelConfig, params, tokenizer)` of a run directory of any stage, or of a Hugging Face directory.

    A run with adapters (`config.peft`) gives its base with the adapters merged (LoRA folded into the kernels,
    a quantised base dequantised; soft prompts and prefixes stay, in the config and params).
    A run's newest intact checkpoint gives its model: the policy for pretraining, SFT, DPO and PPO runs (a
    PPO checkpoint holds actor and critic; its metadata names the actor as the policy), the scalar-head
    model of a reward or classification run; a Hugging Face directory's causal LM or `*ForSequenceClassification`
    (reward model or classifier, `cfg.num_labels`; `labels` names the classes). `head` ("lm", "scalar" or
    "lm+scalar", lm.model.HEADS) is checked against what it holds ("scalar" also takes an "lm+scalar" run, e.g. a reward
    model trained with an LM loss, without its language-model head). `cfg`, when given, must be the same model as
    the saved one (it may differ in RUNTIME_FIELDS, e.g. param_dtype); the params are loaded in its layout and
    dtype and it is the config returned.
    Params land on `mesh` under `rules` (default lm.sharding.RULES) or, without a mesh, on the first local
    device. The tokenizer (`lm.tokenizers.load`) is `tokenizer` (a path), else the run's or Hugging Face
    directory's own, else None.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory (expected a run directory or a Hugging Face one)")
    rules = sharding.RULES if rules is None else rules
    if is_hf_dir(path):
        from lm import hf

        held = hf.head_of(path)  # a *ForSequenceClassification directory holds a reward model or classifier
        if head is not None and head != held:
            raise ValueError(f"{path} is a Hugging Face {_HELD.get(held, 'language model')} "
                             f"({held!r} head), not the {head!r} head asked for")
        saved, params = hf.load(path, dtype=None if cfg is None else cfg.param_dtype)
        if cfg is not None:
            saved.check_same_model(cfg, f"the Hugging Face directory {path}")
        cfg = cfg or saved
        if mesh is not None:
            params = jax.device_put(params, jax.tree.map(lambda a: a.sharding, abstract_params(cfg, held, mesh, rules)))
    else:
        meta = load_meta(path)
        saved = ModelConfig.from_dict(meta["model"])
        if peft.enabled(saved):  # the adapters merged into the base, quantised as in training
            saved, base, trainable = _adapted(path, meta, head, mesh, rules)
            merged, params = peft.merge_lora(saved, peft.merge(peft.quantize_base(saved, base), trainable))
            if cfg is not None:
                merged.check_same_model(cfg, f"the run {path}")
                params = jax.tree.map(lambda x: x.astype(cfg.params_dtype), params)
            return cfg or merged, params, tokenizer_of(path, tokenizer)
        if cfg is not None:
            saved.check_same_model(cfg, f"the run {path}")
        cfg = cfg or saved
        params = _read_policy(path, meta, head, lambda h: abstract_params(cfg, h, mesh, rules))
    return cfg, params, tokenizer_of(path, tokenizer)


def labels(path: str) -> Optional[list[str]]:
    """The class names of a classifier, index = class id: a classification run's (its checkpoint metadata's
    `labels`, fixed when it started) or a Hugging Face directory's (`id2label`); None for other models."""
    if is_hf_dir(path):
        from lm import hf

        return hf.labels(path)
    return load_meta(path).get("labels")


def tokenizer_of(path: str, tokenizer: Optional[str] = None) -> Optional[tokenizers.TokenizerLike]:
    """The tokenizer at `tokenizer` (a path), else the run's or Hugging Face directory's own, else None."""
    if tokenizer is None:
        tokenizer = home(path) if has_tokenizer(home(path)) else None
    return tokenizers.load(tokenizer) if tokenizer else None

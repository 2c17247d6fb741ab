"""Launchers (`python -m experiments.NAME --config=configs/NAME.py:PRESET --workdir=DIR`) and the wiring they share.

Each launcher only connects a config to library calls; a run directory ends up self-contained:
`config.json`, `tokenizer.model`, `metrics.jsonl`, `tensorboard/` and `checkpoints/` (whose metadata
holds the model config), so the next stage can start from it with `--config.init_from=DIR`.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import sys
from typing import Optional

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from lm import checkpoint, distributed, presets
from lm.trainer import local_batch_size
from lm.config import ModelConfig
from lm.model import Transformer
from lm.tokenizer import Tokenizer


def _unknown_override(config, argv) -> Optional[str]:
    """A message naming the first `--config.a.b=` whose key the loaded config does not have, if any."""
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node, done = config, []
        for part in key.split("."):
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if part not in fields:
                where = ".".join(done) or "the config"
                return (f"unknown config key {key!r} in {arg!r}: {where} has no field {part!r}; "
                        f"its fields are: {', '.join(sorted(fields)) or '(none: it is a value)'}")
            node, done = node[part], done + [part]
    return None


def _load_config(argv):
    """The config that `--config=FILE[:PRESET]` in argv names (None if absent or unloadable)."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return None
    path, _, preset = spec.partition(":")
    try:
        loader = importlib.util.spec_from_file_location("_launcher_config", path)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        return module.get_config(preset) if preset else module.get_config()
    except Exception:  # the flag parser reports the config file's own errors
        return None


def parse_flags(argv):
    """absl flag parsing that turns a bad `--config.x.y=` into one clear line instead of a traceback."""
    try:
        rest = flags.FLAGS(argv)
    except Exception as e:  # ml_collections raises KeyError/AttributeError/ValueError from deep inside
        config = _load_config(argv)
        message = (config is not None and _unknown_override(config, argv)) or f"{type(e).__name__}: {e}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    if not flags.FLAGS["verbosity"].present:  # warnings only unless asked: orbax logs every save at INFO
        flags.FLAGS.verbosity = -1
    return rest


def run(main) -> None:
    """`absl.app.run(main)` with the clear config-override errors of `parse_flags`.

    Logging defaults to warnings only, keeping the progress bar readable; `--verbosity=0` brings INFO back.
    """
    app.run(main, flags_parser=parse_flags)


def checkpoint_dir(path: str) -> str:
    """The checkpoint directory of `path`, which may be a run directory or its `checkpoints/` itself."""
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def model_config(config, base: Optional[dict] = None) -> ModelConfig:
    """`config.model.preset` (or `base`, a saved ModelConfig dict, when given) with the non-None overrides."""
    overrides = {k: v for k, v in config.model.overrides.to_dict().items() if v is not None}
    if base is not None:
        return ModelConfig.from_dict(base).replace(**overrides)
    return presets.get(config.model.preset, **overrides)


def build_params(model_cfg: ModelConfig, head: str = "lm"):
    """`rng -> boxed params` of `Transformer(model_cfg, head)` (the input to lm.trainer.fit)."""
    def build(rng):
        tokens = jnp.zeros((1, 8), jnp.int32)
        return Transformer(model_cfg, head=head).init(rng, tokens, prefix_len=jnp.zeros((1,), jnp.int32))["params"]
    return build


def init_from(config):
    """`(model_config_dict, init_params)` of `config.init_from` (None, None when it is empty).

    init_params maps abstract params (with shardings) to the run's latest saved parameters.
    """
    if not config.init_from:
        return None, None
    ckpt = checkpoint_dir(config.init_from)
    meta = checkpoint.load_meta(ckpt)
    if "model" not in meta:
        raise ValueError(f"checkpoint {ckpt} has no model config in its metadata")
    return meta["model"], lambda abstract: checkpoint.load_params(ckpt, abstract)


def start_from_sft(config, workdir: str, needs: str):
    """The common start of the stages that begin from an SFT run (`config.init_from`): reward, PPO, DPO.

    Returns `(model config, init_params of the SFT run, its checkpoint dir, tokenizer)`; the tokenizer is
    `config.data.tokenizer` or the SFT run's, copied into `workdir`, and the config is saved there. `needs`
    completes the error raised when `init_from` is empty.
    """
    if not config.init_from:
        raise ValueError(f"config.init_from must name the SFT run {needs}")
    base_model, init_params = init_from(config)
    model_cfg = model_config(config, base_model)
    sft_ckpt = checkpoint_dir(config.init_from)
    source = config.data.tokenizer or os.path.join(os.path.dirname(sft_ckpt.rstrip("/")), "tokenizer.model")
    tok = run_tokenizer(workdir, source)
    check_vocab(tok, model_cfg)
    save_config(config, workdir)
    return model_cfg, init_params, sft_ckpt, tok


def check_vocab(tokenizer: Tokenizer, model_cfg: ModelConfig) -> None:
    """Every token id must have an embedding row."""
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model_cfg.vocab_size}; set --config.model.overrides.vocab_size={tokenizer.vocab_size}")


def text_files(path: str) -> list[str]:
    """`path` itself, or the `.txt` files under a directory (recursively, sorted)."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
        if not files:
            raise FileNotFoundError(f"data.path {path} holds no .txt files")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.path {path} does not exist")
    return [path]


def run_tokenizer(workdir: str, source: str = "", train_on: Optional[str] = None, vocab_size: int = 0) -> Tokenizer:
    """The run's tokenizer, kept as `WORKDIR/tokenizer.model`.

    Copied from `source` when given; otherwise, unless the run already has one, trained on the text under
    `train_on` with `vocab_size` ids (by process 0; the others wait).
    """
    target = os.path.join(workdir, "tokenizer.model")
    if distributed.is_primary():
        os.makedirs(workdir, exist_ok=True)
        if source:
            src = Tokenizer.load(source).path
            if os.path.abspath(src) != os.path.abspath(target):
                shutil.copyfile(src, target)
        elif not os.path.exists(target):
            if train_on is None:
                raise ValueError("no tokenizer: set data.tokenizer (or init_from a run that has one)")
            logging.info("training a %d-piece tokenizer on %s", vocab_size, train_on)
            Tokenizer.train(text_files(train_on), vocab_size, target[:-len(".model")])
    distributed.barrier("tokenizer")
    return Tokenizer.load(target)


def save_config(config, workdir: str) -> None:
    """Write the resolved config to `WORKDIR/config.json` (process 0)."""
    if distributed.is_primary():
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1, default=str)


def data_kwargs(config) -> dict:
    """Arguments every lm.data pipeline takes, from the config and this process's place in the run."""
    return dict(seq_len=config.data.seq_len, batch_size=local_batch_size(config), seed=config.seed,
                process_index=jax.process_index(), process_count=jax.process_count(),
                cache_dir=config.data.cache_dir or None, eval_fraction=config.data.eval_fraction)

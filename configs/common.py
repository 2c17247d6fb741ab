"""Config sections shared by every training job (pretrain, SFT, and the later RLHF stages).

A job's `get_config(preset)` starts from `base(...)` and fills in its `data` section and its presets.
Override anything from the command line: `--config.train.steps=100 --config.mesh.shape="(2,2,2)"`.
"""
import dataclasses
import typing

import ml_collections as mlc
from ml_collections import config_dict

from lm import sharding
from lm.config import ModelConfig
from lm.peft import PeftConfig


def _placeholder(field: dataclasses.Field):
    """A None-valued field typed like the ModelConfig field (so `--config.model.overrides.X=` parses)."""
    hint = typing.get_type_hints(ModelConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    kind = hint if isinstance(hint, type) else args[0] if args and isinstance(args[0], type) else str
    return config_dict.placeholder(kind)


def model(preset: str) -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.preset = preset  # an lm.presets name (llama-7b, bloom-7b1, glm-6b, llama-tiny, ...)
    # Any lm.config.ModelConfig field (documented there), e.g. n_layers, dtype="bfloat16", remat="full";
    # None keeps the preset's value.
    c.overrides = mlc.ConfigDict({f.name: _placeholder(f) for f in dataclasses.fields(ModelConfig)})  # see above
    return c


def rules() -> mlc.ConfigDict:
    """lm.sharding.RULES as a config section: `{logical axis: "mesh_axis" | "axis1,axis2" | ""}`."""
    return mlc.ConfigDict({name: ",".join((axes,) if isinstance(axes, str) else axes or ())
                           for name, axes in sharding.RULES})


def from_dataclass(cls, **values) -> mlc.ConfigDict:
    """A config section with every field of the dataclass `cls` (its defaults, then `values`).

    The dataclass is the one source of the defaults and documents each field in its docstring; the code
    that uses the section builds `cls(**section)` from it.
    """
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return mlc.ConfigDict({**fields, **values})


def mesh(shape=(1, -1, 1)) -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.shape = shape  # devices per mesh axis; one -1 takes the remaining devices
    c.axes = ("data", "fsdp", "tensor")  # mesh axis names (the rules below refer to them)
    # Logical axis -> mesh axes ("a,b" for several, "" replicated); first match wins when a tensor would use
    # one mesh axis twice. A dim its mesh axes do not divide is replicated (with a warning).
    c.rules = rules()  # one entry per logical axis name used by lm.model (default: lm.sharding.RULES)
    return c


def optim(lr: float, warmup_steps: int, weight_decay: float = 0.1) -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.lr = lr  # peak learning rate (after warmup)
    c.warmup_steps = warmup_steps  # linear warmup from 0
    c.decay_steps = 0  # steps of warmup + cosine decay; 0 = train.steps
    c.end_lr_ratio = 0.1  # final learning rate as a fraction of lr
    c.b1 = 0.9  # AdamW beta1
    c.b2 = 0.95  # AdamW beta2 (LLaMA, GPT-3)
    c.eps = 1e-8  # AdamW epsilon
    c.weight_decay = weight_decay  # decoupled weight decay
    c.no_decay = ("norms", "biases", "embeddings")  # parameter kinds exempt from weight decay
    c.clip_norm = 1.0  # global gradient-norm clip; 0 disables
    return c


def train(steps: int, batch_size: int, *, log_every: int = 10, eval_every: int = 100) -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.steps = steps  # optimiser steps
    c.batch_size = batch_size  # sequences per step, over all processes
    c.micro_batches = 1  # gradient accumulation: each step runs this many micro-batches of batch_size / k
    c.log_every = log_every  # write metrics.jsonl / TensorBoard every this many steps
    c.eval_every = eval_every  # held-out loss/perplexity every this many steps (and at the end); 0 = never
    c.eval_batches = 4  # batches per evaluation
    c.max_bad_steps = 10  # stop after this many updates in a row skipped for a non-finite loss/gradient
    return c


def checkpoint(every_steps: int, max_to_keep: int = 3) -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.every_steps = every_steps  # save every this many steps (and at the end); 0 = only at the end
    c.max_to_keep = max_to_keep  # keep the newest this many checkpoints
    c.async_save = True  # write in the background while training continues
    return c


def distributed() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.coordinator_address = ""  # "host:port" of process 0; "" = $JAX_COORDINATOR_ADDRESS, else single process
    c.num_processes = 0  # processes in the run; <= 0 = $JAX_NUM_PROCESSES
    c.process_id = -1  # this process's index; < 0 = $JAX_PROCESS_ID
    c.auto = False  # without an address, let JAX detect the cluster (TPU pods, SLURM)
    return c


def base(*, model_preset: str, steps: int, batch_size: int, lr: float, warmup_steps: int, checkpoint_every: int,
         mesh_shape=(1, -1, 1), log_every: int = 10, eval_every: int = 100) -> mlc.ConfigDict:
    """The sections every job has; the job adds `data` (and may change anything)."""
    c = mlc.ConfigDict()
    c.seed = 0  # parameter init, data shuffling and the per-step RNG
    c.init_from = ""  # a run directory (or its checkpoints/) whose parameters start this run; "" = random init
    c.model = model(model_preset)  # which Transformer: preset + overrides
    c.mesh = mesh(mesh_shape)  # device mesh and logical-axis rules
    c.optim = optim(lr, warmup_steps)  # AdamW, schedule, clipping
    c.train = train(steps, batch_size, log_every=log_every, eval_every=eval_every)  # the loop
    c.checkpoint = checkpoint(checkpoint_every)  # orbax saving
    c.distributed = distributed()  # multi-process setup
    # --config.peft.method=lora|qlora|prompt|prefix --config.peft.rank=8 ...; "none" = full fine-tuning.
    c.peft = from_dataclass(PeftConfig)  # adapters on a frozen init_from model: fields in lm.peft.PeftConfig
    return c

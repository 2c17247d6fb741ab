"""Parameter-efficient adaptation: LoRA, QLoRA (quantised frozen base), prompt and prefix tuning.

The adapters are parameters of the one Transformer (lm.model: `lora_a`/`lora_b` beside a projection's
kernel, `soft_prompt`, per-layer `prefix_k`/`prefix_v`), switched on by ModelConfig fields (`lora_rank`,
`prompt_tokens`, `prefix_tokens`, `quant`). A stage keeps two trees:
- the *trainable* tree: the adapters (and a scalar model's `score` head), the train state's `params`, the
  only leaves with gradients and optimiser moments, and all a checkpoint holds;
- the frozen *base*: the starting model's weights (quantised with `quant`), an input to every step, never
  written. `merge(base, trainable)` is the model's whole param tree (a dict merge: no copy).
With the adapters off (`base_config`) the same base is the starting model itself: DPO's and PPO's reference.

PeftConfig is the `peft` section of every stage's config (`--config.peft.method=lora --config.peft.rank=8`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable
import flax.linen as nn
import jax
import jax.numpy as jnp

from lm import quant, sharding
from lm.config import ADAPTER_FIELDS, QUANT_TARGETS, ModelConfig

METHODS = ("none", "lora", "qlora", "prompt", "prefix")
ADAPTER_LEAVES = ("lora_a", "lora_b", "soft_prompt", "prefix_k", "prefix_v")
# Projections contracting more than their last input axis: the attention output (heads, head_dim).
_N_IN = {"o": 2}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeftConfig:
    """How a stage adapts its starting model (the `peft` config section).

    Attributes:
      method: "none" (full fine-tuning), "lora", "qlora" (LoRA on a base stored `quant`), "prompt" (soft
        prompt, Lester et al. 2021) or "prefix" (per-layer key/value prefixes, P-tuning v2).
      rank: LoRA rank r (QLoRA paper 64; PEFT default 8).
      alpha: LoRA scale numerator: the update is scaled by alpha / r (QLoRA 16; PEFT 8).
      dropout: dropout on the adapters' inputs in training (PEFT 0.0; QLoRA 0.05-0.1): each target draws a
        mask over its whole input, which costs memory at long sequences (LLaMA-7B SFT at 16 x 2048: 11.4
        against 9.4 GiB of temporaries per device); PPO's update runs without it.
      rslora: scale by alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023).
      targets: comma-separated projections with adapters: q,k,v,o,wi,wg,wo,lm_head (QLoRA: every linear
        layer of the blocks; PEFT's Llama default: q,v). One the model lacks is skipped: wg without a gated
        MLP, lm_head with tied embeddings.
      virtual_tokens: soft-prompt or prefix length (Lester et al. 20-100; P-tuning v2 16-128).
      quant: format of the frozen base with method="qlora": "nf4" (QLoRA), "int8" or "int4".
      quant_block: quantisation block size (QLoRA 64).
    """
    method: str = "none"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False
    targets: str = "q,k,v,o,wi,wg,wo"
    virtual_tokens: int = 20
    quant: str = "nf4"
    quant_block: int = 64

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"peft.method={self.method!r} is not one of {METHODS}")
        if self.method == "qlora" and self.quant not in quant.FORMATS:
            raise ValueError(f"peft.quant={self.quant!r} is not one of {quant.FORMATS}")


def adapt(cfg: ModelConfig, pc: PeftConfig) -> ModelConfig:
    """`cfg` with the adapters (and base format) of `pc` switched on."""
    if pc.method == "none":
        return cfg
    if cfg.has_adapters or cfg.quant != "none":
        raise ValueError("this model already has adapters or a quantised base; start from a merged model "
                         "(lm.load merges a LoRA run)")
    if pc.method in ("lora", "qlora"):
        cfg = cfg.replace(lora_rank=pc.rank, lora_alpha=pc.alpha, lora_targets=pc.targets,
                          lora_dropout=pc.dropout, lora_rslora=pc.rslora)
        if pc.method == "qlora":
            cfg = cfg.replace(quant=pc.quant, quant_block=pc.quant_block)
        return cfg
    return cfg.replace(**{f"{pc.method}_tokens": pc.virtual_tokens})


def enabled(cfg: ModelConfig) -> bool:
    """True when `cfg` has adapters (LoRA, soft prompt or prefix)."""
    return cfg.has_adapters


def base_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the adapters off (the base keeps its storage format): the frozen model alone."""
    return cfg.replace(lora_rank=0, prompt_tokens=0, prefix_tokens=0)


def _names(path) -> list[str]:
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def is_trainable(path, head: str = "lm") -> bool:
    """True for an adapter leaf, and for the `score` head of a model with one ("scalar" or "lm+scalar": reward
    model, critic, classifier)."""
    names = _names(path)
    return bool(names) and (names[-1] in ADAPTER_LEAVES or (head != "lm" and names[0] == "score"))


def split(params, head: str = "lm") -> tuple[dict, dict]:
    """`(base, trainable)`: the param tree cut in two by `is_trainable` (nested dicts, boxed or not)."""
    def cut(tree, path, want):
        out = {}
        for k, v in tree.items():
            p = path + (jax.tree_util.DictKey(k),)
            if isinstance(v, dict):
                sub = cut(v, p, want)
                if sub:
                    out[k] = sub
            elif is_trainable(p, head) == want:
                out[k] = v
        return out

    return cut(params, (), False), cut(params, (), True)


def merge(base, trainable) -> dict:
    """The whole param tree of base and trainable leaves (nested dicts; the arrays are not copied)."""
    out = dict(base)
    for k, v in trainable.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def boxed_trainable(cfg: ModelConfig, rng, head: str = "lm") -> dict:
    """Randomly initialised leaves a stage trains of `Transformer(cfg, head)`, boxed with logical names: with
    adapters the trainable ones (under jit the base's own init is dead code, never computed), without them
    the whole model."""
    from lm.model import boxed_params

    params = boxed_params(cfg, rng, head)
    return split(params, head)[1] if enabled(cfg) else params


def init_trainable(cfg: ModelConfig, rng, head: str, shardings) -> dict:
    """Fresh trainable leaves of `Transformer(cfg, head)` (`boxed_trainable`), built laid out by `shardings`."""
    mesh = jax.tree.leaves(shardings)[0].mesh
    with jax.set_mesh(mesh):
        return jax.jit(lambda r: nn.unbox(boxed_trainable(cfg, r, head)), out_shardings=shardings)(rng)


def abstract_base(cfg: ModelConfig, head: str = "lm", mesh=None, rules=None):
    """ShapeDtypeStructs (with shardings on `mesh`) of the frozen base of `Transformer(cfg, head)`."""
    from lm.model import boxed_params

    boxed = jax.eval_shape(functools.partial(boxed_params, cfg, head=head), jax.random.key(0))
    boxed = split(boxed, head)[0]
    if mesh is None:
        return nn.unbox(boxed)
    shardings = sharding.tree_shardings(boxed, mesh, sharding.RULES if rules is None else rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)


def plain_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` without adapters and with float kernels (every adaptation field at its default): the model a
    parameter-efficient run started from."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in ADAPTER_FIELDS}
    return cfg.replace(**defaults)


@dataclasses.dataclass
class Frozen:
    """A parameter-efficient run's frozen base: `params` laid out by `shardings` (in `cfg.quant`'s format)."""
    params: Any
    shardings: Any


def frozen_base(cfg: ModelConfig, load: Callable, head: str, mesh, rules=None) -> Frozen:
    """The frozen base of the adapted `cfg` for a `head` model, on `mesh`.

    load: `abstract params -> params` of the starting language model (`plain_config(cfg)`, "lm" head), e.g.
    lm.runs.init_from's loader. A scalar-head model (reward model, critic, classifier) keeps the trunk (its
    `score` head is trainable), an "lm+scalar" one the language-model head too; with `cfg.quant` the layer
    projections are quantised on the devices, shard by shard.
    """
    from lm.model import abstract_params, scalar_params

    rules = sharding.RULES if rules is None else rules
    params = load(abstract_params(plain_config(cfg), "lm", mesh, rules))
    if head == "scalar":
        params = scalar_params(params)
    shardings = jax.tree.map(lambda a: a.sharding, abstract_base(cfg, head, mesh, rules))
    with jax.set_mesh(mesh):
        base = jax.jit(functools.partial(quantize_base, cfg), out_shardings=shardings)(params)
    return Frozen(base, shardings)


def _map_projections(params, fn):
    """`fn(name, module_params, n_in)` applied to every layer projection (the scanned `layers` subtree)."""
    def walk(tree):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict) and k in QUANT_TARGETS and "kernel" in v:
                out[k] = fn(k, v, _N_IN.get(k, 1))
            elif isinstance(v, dict):
                out[k] = walk(v)
            else:
                out[k] = v
        return out

    return {k: walk(v) if k == "layers" else v for k, v in params.items()}


def quantize_base(cfg: ModelConfig, params) -> dict:
    """Float params of `cfg`'s model -> the same with every layer projection's kernel stored `cfg.quant`
    (`kernel` codes + `kernel_scale`); other leaves unchanged. The identity when `cfg.quant` is "none"."""
    if cfg.quant == "none":
        return params

    def q(name, p, n_in):
        codes, scale = quant.quantize(p["kernel"], cfg.quant, cfg.quant_block, axis=n_in, n_in=n_in)  # 0: layers
        return {**p, "kernel": codes, "kernel_scale": scale}

    return _map_projections(params, q)


def quantize(cfg: ModelConfig, params, fmt: str = "int8", block: int = 64, *,
             head: bool = False) -> tuple[ModelConfig, dict]:
    """Quantised inference: `(cfg, params)` of a loaded model with its layers' projection kernels stored `fmt`:
    "int8", "int4" or "nf4" (weight-only, absmax scale per `block` inputs) or "w8a8" (int8 weights per output
    column and int8 activations, lm.quant); with `head` the (untied) output head too. Embeddings and norms stay
    as they are. `lm.generate`, `lm.stream` and the chat REPL take the result as it is."""
    if cfg.quant != "none" or cfg.lora_rank:
        raise ValueError("lm.quantize takes a plain model (lm.load merges adapters); this one is already "
                         f"quantised ({cfg.quant}) or has LoRA adapters")
    if fmt not in quant.INFERENCE_FORMATS:
        raise ValueError(f"lm.quantize: format {fmt!r} is not one of {quant.INFERENCE_FORMATS}")
    qcfg = cfg.replace(quant=fmt, quant_block=block, quant_head=head)

    def run(params):
        out = quantize_base(qcfg, params)
        if head:
            codes, scale = quant.quantize(params["lm_head"]["kernel"], fmt, block, axis=0)
            out = {**out, "lm_head": {**params["lm_head"], "kernel": codes, "kernel_scale": scale}}
        return out

    return qcfg, jax.jit(run)(params)


def dequantize_base(cfg: ModelConfig, params, dtype=jnp.float32) -> dict:
    """The inverse of `quantize_base` (up to rounding): float kernels in `dtype`."""
    if cfg.quant == "none":
        return params

    def dq(name, p, n_in):
        kernel = quant.dequantize(p["kernel"], p["kernel_scale"], cfg.quant, axis=n_in, dtype=dtype)
        return {k: v for k, v in p.items() if k != "kernel_scale"} | {"kernel": kernel}

    return _map_projections(params, dq)


def merged_config(cfg: ModelConfig) -> ModelConfig:
    """The config of `merge_lora`'s result: no LoRA, float kernels (soft prompts and prefixes stay)."""
    plain = plain_config(cfg)
    return plain.replace(prompt_tokens=cfg.prompt_tokens, prefix_tokens=cfg.prefix_tokens)


def merge_lora(cfg: ModelConfig, params, dtype=None) -> tuple[ModelConfig, dict]:
    """`(merged_config(cfg), params)` with every LoRA update folded into its kernel, `W + s * A B`, and a
    quantised base dequantised first. The merged model computes what base + adapters computed."""
    dtype = dtype or cfg.params_dtype
    params = dequantize_base(cfg, params, jnp.float32)
    s = cfg.lora_scale if cfg.lora_rank else 0.0

    def fold(tree, lead):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict) and "lora_a" in v:
                kernel, a, b = (v[n].astype(jnp.float32) for n in ("kernel", "lora_a", "lora_b"))
                r = a.shape[-1]
                # A [L?, *in, r] @ B [L?, r, *out] has the kernel's shape [L?, *in, *out].
                delta = jnp.matmul(a.reshape(a.shape[:lead] + (-1, r)), b.reshape(b.shape[:lead] + (r, -1)))
                out[k] = {n: x for n, x in v.items() if n not in ("lora_a", "lora_b")}
                out[k]["kernel"] = (kernel + s * delta.reshape(kernel.shape)).astype(dtype)
            elif isinstance(v, dict):
                out[k] = fold(v, lead)
            else:
                out[k] = v
        return out

    merged = {}
    for k, v in params.items():
        merged.update(fold({k: v}, 1 if k == "layers" else 0))
    return merged_config(cfg), merged


def count(tree) -> int:
    """Number of scalars in a param tree."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def trainable_fraction(cfg: ModelConfig, head: str = "lm") -> float:
    """Trainable parameters / all parameters of `Transformer(cfg, head)`, the base counted as float weights
    (not as its quantised codes); from shapes, nothing is allocated."""
    from lm.model import abstract_params

    trainable = split(abstract_params(cfg, head), head)[1]
    base = split(abstract_params(plain_config(cfg), head), head)[0]
    return count(trainable) / max(count(base) + count(trainable), 1)


"""Hugging Face PEFT adapter directories <-> our adapters: `save_adapter` and `load_adapter`.

A directory (`adapter_config.json` + `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(base, path)`
puts on the base `lm.hf.save` wrote. Three PEFT types map onto our adapters (lm.peft):
- LORA: `<module>.lora_A.weight` `[r, in]`, `<module>.lora_B.weight` `[out, r]`; names and layouts from lm.hf_arch's
  tensor maps (lora_a laid out as a kernel whose output is r, lora_b as one whose input is r). An HF module that
  fuses several of our projections (q/k/v, gate/up) cannot hold separate LoRAs: targeting one is an error.
- PROMPT_TUNING: `prompt_embeddings` `[n, d_model]`, our `soft_prompt`.
- PREFIX_TUNING (no projection): `prompt_embeddings` `[n, (n_layers, 2, n_kv_heads, head_dim)]`, our `prefix_k` and
  `prefix_v`, which PEFT passes as the (post-RoPE) cached keys/values of positions 0..n-1.
Virtual tokens shift the real ones to positions n.., in PEFT as here.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Optional

import flax.linen as nn
import numpy as np
import safetensors.numpy
from flax import traverse_util

from lm import hf_arch, peft
from lm.config import LORA_TARGETS, ModelConfig
from lm.hf_arch import TensorMap
from lm.model import abstract_params

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModel -> the *ForCausalLM's own names
_PROMPT = "prompt_embeddings"
# LoRA options without a counterpart here (off when absent, falsy or "none").
_LORA_OFF = ("use_dora", "rank_pattern", "alpha_pattern", "lora_bias", "bias", "modules_to_save", "use_qalora",
             "layer_replication", "trainable_token_indices", "target_parameters")


def _projections(cfg: ModelConfig, arch: hf_arch.Arch) -> list[tuple[TensorMap, list[str]]]:
    """`(map, our projection paths)` of every HF weight of `arch` holding LoRA-capable projections of `cfg`."""
    maps = [(m, [o.removesuffix("/kernel") for o in m.ours]) for m in arch.tensor_maps(cfg)]
    return [(m, ps) for m, ps in maps if m.kind in ("linear", "conv1d") and
            any(p.rsplit("/", 1)[-1] in LORA_TARGETS for p in ps)]


def _fused_error(arch: hf_arch.Arch, m: TensorMap, paths: list[str]) -> ValueError:
    names = ", ".join(p.rsplit("/", 1)[-1] for p in paths)
    return ValueError(f"{arch.name} fuses our projections {names} into one tensor {m.hf!r}: a PEFT LoRA there is one "
                      "adapter for all of them, so separate LoRAs cannot be written as one (or read from one)")


def _lora_leaves(m: TensorMap, path: str, n_layers: int):
    """`(our leaf, its layout, PEFT keys per layer)` of a module's lora_a and lora_b. lora_a is laid out as a
    kernel whose output is r, lora_b as one whose input is r, as torch Linear weights even for GPT-2's Conv1D
    (PEFT's adapters are Linear layers there too)."""
    names = [m.hf.format(i=i) for i in range(n_layers)] if "{i}" in m.hf else [m.hf]
    for leaf, n_in in (("a", m.n_in), ("b", 1)):
        keys = [f"{_PREFIX}{n.removesuffix('.weight')}.lora_{leaf.upper()}.weight" for n in names]
        yield f"{path}/lora_{leaf}", dataclasses.replace(m, kind="linear", n_in=n_in), keys


def _adapter_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Our adapter leaves of `Transformer(cfg)`, slash-joined paths -> shapes (nothing allocated)."""
    flat = traverse_util.flatten_dict(peft.split(abstract_params(cfg))[1], sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def _lora_to_hf(cfg: ModelConfig, arch: hf_arch.Arch, flat: dict) -> tuple[dict, dict]:
    targets, tensors = [], {}
    for m, paths in _projections(cfg, arch):
        if any(f"{p}/lora_a" in flat for p in paths):
            if len(paths) > 1:
                raise _fused_error(arch, m, paths)
            targets.append(m)
            for ours, layout, keys in _lora_leaves(m, paths[0], cfg.n_layers):
                x = np.asarray(flat.pop(ours))
                tensors.update({k: np.ascontiguousarray(layout.to_hf([x[i] if "{i}" in m.hf else x]))
                                for i, k in enumerate(keys)})
    if flat:
        raise ValueError(f"{arch.name} has no HF module for the adapter leaves {sorted(flat)}")
    # PEFT matches a name or a "."-suffix: a module's name inside its layer ("self_attn.q_proj"; GPT-2's attention
    # and MLP both have a `c_proj`) is unique. Conv1D modules need (PEFT would force) fan_in_fan_out.
    modules = sorted({m.hf.removesuffix(".weight").split("{i}.")[-1] for m in targets})
    return dict(peft_type="LORA", r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, use_rslora=cfg.lora_rslora,
                lora_dropout=cfg.lora_dropout, target_modules=modules, bias="none",
                fan_in_fan_out=any(m.kind == "conv1d" for m in targets)), tensors


def _virtual_to_hf(cfg: ModelConfig, flat: dict) -> tuple[dict, dict]:
    common = dict(num_virtual_tokens=cfg.virtual_tokens, num_layers=cfg.n_layers, num_transformer_submodules=1)
    if cfg.prompt_tokens:
        return (dict(peft_type="PROMPT_TUNING", token_dim=cfg.d_model, num_attention_heads=cfg.n_heads,
                     prompt_tuning_init="RANDOM", **common), {_PROMPT: np.asarray(flat["soft_prompt"])})
    kv = np.stack([np.asarray(flat["layers/attn/prefix_k"]), np.asarray(flat["layers/attn/prefix_v"])])
    emb = kv.transpose(2, 1, 0, 3, 4).reshape(cfg.prefix_tokens, -1)  # [2, L, n, Hkv, D] -> [n, (L, 2, Hkv, D)]
    token_dim = cfg.kv_heads * cfg.dim_per_head
    return (dict(peft_type="PREFIX_TUNING", token_dim=token_dim, num_attention_heads=cfg.kv_heads,
                 encoder_hidden_size=token_dim, prefix_projection=False, **common), {_PROMPT: np.ascontiguousarray(emb)})


def save_adapter(cfg: ModelConfig, trainable, path, *, architecture: Optional[str] = None,
                 base_model_name_or_path: str = "") -> pathlib.Path:
    """Write the adapters of `Transformer(cfg)` as a PEFT adapter directory for the HF model `lm.hf.save` writes.

    Args:
      cfg: the adapted config: LoRA, prompt or prefix tuning (one PEFT type per directory). With QLoRA, the HF base
        is the dequantised one.
      trainable: the adapter leaves (`lm.peft.split(params)[1]`, boxed or not).
      path: output directory (created): adapter_config.json + adapter_model.safetensors.
      architecture: HF architecture of the base (None: `lm.hf_arch.default_for(cfg)`, as `lm.hf.save`).
      base_model_name_or_path: written into adapter_config.json (where PEFT looks for the base by default).
    Returns:
      The directory. A LoRA on a projection the architecture fuses with others (qkv, gate/up) is a ValueError.
    """
    flat = traverse_util.flatten_dict(nn.unbox(trainable), sep="/")
    want, got = _adapter_shapes(cfg), {k: tuple(np.shape(v)) for k, v in flat.items()}
    if got != want:
        raise ValueError(f"trainable leaves (path, shape) {sorted(got.items() - want.items())} differ from cfg's "
                         f"adapters {sorted(want.items() - got.items())}")
    if bool(cfg.lora_rank) + bool(cfg.virtual_tokens) != 1:
        raise ValueError("a PEFT adapter directory holds one method: cfg needs exactly one of LoRA (lora_rank) and "
                         f"prompt/prefix tuning (lora_rank={cfg.lora_rank}, virtual tokens={cfg.virtual_tokens})")
    arch = hf_arch.get(architecture or hf_arch.default_for(cfg))
    conf, tensors = _lora_to_hf(cfg, arch, flat) if cfg.lora_rank else _virtual_to_hf(cfg, flat)
    conf.update(task_type="CAUSAL_LM", inference_mode=True, base_model_name_or_path=base_model_name_or_path)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})
    (path / CONFIG).write_text(json.dumps(conf, indent=2, sort_keys=True))
    return path


def _lora_from_hf(conf: dict, tensors: dict, cfg: ModelConfig, arch: hf_arch.Arch, take, path):
    on = {k: conf[k] for k in _LORA_OFF if conf.get(k) and conf.get(k) != "none"}
    if on or not conf.get("r"):
        raise ValueError(f"{path / CONFIG}: LoRA option(s) not supported here: {on or {'r': conf.get('r')}}")
    found, projections = [], _projections(cfg, arch)  # found: the targets the file has tensors for
    for m, paths in projections:
        if any(k in tensors for _, _, keys in _lora_leaves(m, paths[0], cfg.n_layers) for k in keys):
            if len(paths) > 1:
                raise _fused_error(arch, m, paths)
            found.append(paths[0].rsplit("/", 1)[-1])
    if not found:
        raise ValueError(f"{path / WEIGHTS} has no LoRA tensor of a {arch.name} projection: {sorted(tensors)[:4]}")
    adapted = peft.adapt(cfg, peft.PeftConfig(
        method="lora", rank=int(conf["r"]), alpha=float(conf.get("lora_alpha", 8)), rslora=bool(conf.get("use_rslora")),
        dropout=float(conf.get("lora_dropout") or 0.0), targets=",".join(t for t in LORA_TARGETS if t in found)))
    shapes, flat = _adapter_shapes(adapted), {}
    for m, paths in projections:
        for ours, layout, keys in _lora_leaves(m, paths[0], cfg.n_layers):
            if ours in shapes:
                one = shapes[ours][1:] if "{i}" in m.hf else shapes[ours]
                pieces = [layout.from_hf(take(k, layout.hf_shape([one])), [one])[0] for k in keys]
                flat[ours] = np.stack(pieces) if "{i}" in m.hf else pieces[0]
    return adapted, flat


def _virtual_from_hf(conf: dict, cfg: ModelConfig, method: str, take, path):
    """Prompt or prefix tuning. A prefix trained with `prefix_projection` was saved projected, so it reads alike."""
    n = conf.get("num_virtual_tokens")
    if conf.get("num_transformer_submodules", 1) != 1 or not n:
        raise ValueError(f"{path / CONFIG}: need num_virtual_tokens and one transformer submodule (a causal LM), got "
                         f"{n} and {conf.get('num_transformer_submodules')}")
    adapted = peft.adapt(cfg, peft.PeftConfig(method=method, virtual_tokens=int(n)))
    shapes = _adapter_shapes(adapted)
    if method == "prompt":
        return adapted, {"soft_prompt": take(_PROMPT, shapes["soft_prompt"])}
    L, n, hkv, d = shapes["layers/attn/prefix_k"]
    emb = take(_PROMPT, (n, L * 2 * hkv * d)).reshape(n, L, 2, hkv, d).transpose(2, 1, 0, 3, 4)  # [2, L, n, Hkv, D]
    return adapted, {"layers/attn/prefix_k": emb[0], "layers/attn/prefix_v": emb[1]}


def load_adapter(path, cfg: ModelConfig, *, architecture: Optional[str] = None) -> tuple[ModelConfig, dict]:
    """Read a PEFT adapter directory (LORA, PROMPT_TUNING or PREFIX_TUNING) onto the base model `cfg`.

    Args:
      path: the directory (`adapter_config.json` + `adapter_model.safetensors`).
      cfg: the base model's config (no adapters), e.g. from `lm.hf.load` of the base.
      architecture: HF architecture whose module names a LoRA uses (None: `lm.hf_arch.default_for(cfg)`).
    Returns:
      `(adapted_cfg, trainable)`: `lm.peft.merge(base_params, trainable)` are the params of
      `Transformer(adapted_cfg)`; NumPy leaves in `cfg.param_dtype`. The LoRA targets are the modules the file has
      tensors for. Unsupported types or options and missing, misshapen or unused tensors are ValueErrors naming
      the file and key.
    """
    path = pathlib.Path(path)
    for f in (CONFIG, WEIGHTS):
        if not (path / f).is_file():
            raise FileNotFoundError(f"missing {path / f} (of a PEFT adapter; adapter_model.bin is not read)")
    conf = json.loads((path / CONFIG).read_text())
    methods = {"LORA": "lora", "PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}
    if conf.get("peft_type") not in methods:
        raise ValueError(f"{path / CONFIG}: peft_type {conf.get('peft_type')!r} is not supported (supported: "
                         f"{', '.join(methods)})")
    if peft.enabled(cfg):
        raise ValueError("load_adapter needs the base model's config, but cfg already has adapters")
    tensors = safetensors.numpy.load_file(path / WEIGHTS)

    def take(key: str, shape: tuple) -> np.ndarray:
        """`tensors.pop(key)` in the base's dtype, after checking it is there with `shape`."""
        if key not in tensors or tensors[key].shape != tuple(shape):
            found = f"has shape {tensors[key].shape}" if key in tensors else "is missing"
            raise ValueError(f"tensor {key!r} in {path / WEIGHTS} {found}; {CONFIG} and the base imply {tuple(shape)}")
        return tensors.pop(key).astype(cfg.params_dtype)

    method = methods[conf["peft_type"]]
    if method == "lora":
        arch = hf_arch.get(architecture or hf_arch.default_for(cfg))
        adapted, flat = _lora_from_hf(conf, tensors, cfg, arch, take, path)
    else:
        adapted, flat = _virtual_from_hf(conf, cfg, method, take, path)
    unused = sorted(k for k in tensors if not k.endswith(".base_layer.weight"))  # PEFT's copy of a LoRA'd lm_head
    if unused:
        raise ValueError(f"{len(unused)} tensor(s) in {path / WEIGHTS} are not used: {unused[:8]}")
    return adapted, traverse_util.unflatten_dict(flat, sep="/")

"""Hugging Face architectures as `ModelConfig` mappings, one module per family of layouts.

`get(name)` returns an architecture's `Arch` (config.json <-> ModelConfig fields, tensor names and layouts);
`default_for(cfg)` names the architecture a config is written as. The shared machinery is in `core`.
"""
from __future__ import annotations

from typing import Optional

from lm.config import ModelConfig
from lm.hf_arch import chatglm, gemma, gpt, llama
from lm.hf_arch.core import HARMLESS, Arch, HFConfig, TensorMap, check_consumed, field

ARCHS = {a.name: a for module in (llama, gpt, chatglm, gemma) for a in module.ARCHS}


def get(name: Optional[str]) -> Arch:
    """The architecture called `name`; an unknown one is an error that lists the supported ones."""
    if name not in ARCHS:
        raise ValueError(f"unsupported Hugging Face architecture {name!r}; supported: {', '.join(ARCHS)}")
    return ARCHS[name]


def default_for(cfg: ModelConfig) -> str:
    """The HF architecture a `ModelConfig` is written as when the caller does not choose one."""
    if cfg.position == "learned":
        return "GPT2LMHeadModel"
    if cfg.position == "rope2d" or cfg.residual == "deepnorm":
        return "ChatGLMForConditionalGeneration"
    if cfg.position == "alibi":
        return "BloomForCausalLM" if cfg.norm == "layernorm" else "BaichuanForCausalLM"
    return "GlmForCausalLM" if cfg.rope_interleaved else "LlamaForCausalLM"


__all__ = ["ARCHS", "HARMLESS", "Arch", "HFConfig", "TensorMap", "check_consumed", "default_for", "field", "get"]

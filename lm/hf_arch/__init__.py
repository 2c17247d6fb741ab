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
    """The HF architecture a `ModelConfig` is written as when the caller does not choose one: the first rule
    that matches names one that can express the config (`lm.hf.save` still refuses what it cannot)."""
    if cfg.post_norms or cfg.norm_scale_offset:
        return "Gemma3ForCausalLM" if cfg.qk_norm or cfg.local_rope_theta is not None else "Gemma2ForCausalLM"
    if cfg.residual == "parallel" or (cfg.position == "rope" and cfg.norm == "layernorm"):
        return "GPTNeoXForCausalLM"
    if cfg.position == "learned":
        return "OPTForCausalLM" if cfg.pos_offset or cfg.mlp == "relu" else "GPT2LMHeadModel"
    if cfg.position == "rope2d" or cfg.residual == "deepnorm":
        return "ChatGLMForConditionalGeneration"
    if cfg.position == "alibi":
        return "BloomForCausalLM" if cfg.norm == "layernorm" else "BaichuanForCausalLM"
    if cfg.qk_norm:
        return "Qwen3ForCausalLM"
    if cfg.rope_interleaved:
        return "GlmForCausalLM"
    if cfg.qkv_bias and not cfg.out_bias:  # also any per-layer window pattern (layer_types)
        return "Qwen2ForCausalLM"
    if cfg.rope_fraction != 1.0:  # partial rotary, window (if any) on every layer
        return "Phi3ForCausalLM"
    if cfg.sliding_window is not None:
        return "MistralForCausalLM"
    return "LlamaForCausalLM"  # also Llama-3 / linear / yarn RoPE scaling


__all__ = ["ARCHS", "HARMLESS", "Arch", "HFConfig", "TensorMap", "check_consumed", "default_for", "field", "get"]

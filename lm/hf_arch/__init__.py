"""Hugging Face architectures as `ModelConfig` mappings, one module per family of layouts.

`get(name)` returns an architecture's `Arch` (config.json <-> ModelConfig fields, tensor names and layouts), by its
causal-LM name or its `*ForSequenceClassification` name (`head_of(name)` tells which: "lm" or "scalar", the score
head of a reward model or classifier);
`default_for(cfg)` names the architecture a config is written as. The shared machinery is in `core`.
"""
from __future__ import annotations

from typing import Optional

from lm.config import ModelConfig
from lm.hf_arch import chatglm, gemma, gpt, llama
from lm.hf_arch.core import HARMLESS, Arch, HFConfig, TensorMap, check_consumed, field

ARCHS = {a.name: a for module in (llama, gpt, chatglm, gemma) for a in module.ARCHS}


# Sequence-classification (reward model) names -> the family's Arch.
SEQ_CLS = {a.seq_cls: a for a in ARCHS.values() if a.seq_cls}


def get(name: Optional[str]) -> Arch:
    """The architecture called `name` (a causal-LM or a sequence-classification name); an unknown one is an
    error that lists the supported ones."""
    if name in SEQ_CLS:
        return SEQ_CLS[name]
    if name not in ARCHS:
        raise ValueError(f"unsupported Hugging Face architecture {name!r}; supported: {', '.join(ARCHS)} and, "
                         f"as reward models, {', '.join(SEQ_CLS)}")
    return ARCHS[name]


def head_of(name: Optional[str]) -> str:
    """"scalar" for a `*ForSequenceClassification` architecture name (a reward model or classifier), else "lm"."""
    return "scalar" if name in SEQ_CLS else "lm"


def hf_name(arch: Arch, head: str) -> str:
    """The architecture name `Transformer(cfg, head)` is written as; a scalar head on a family without a
    sequence-classification class in transformers is an error naming it."""
    if head == "lm":
        return arch.name
    if head != "scalar":
        raise ValueError(f"head must be 'lm' or 'scalar', got {head!r}")
    if arch.seq_cls is None:
        raise ValueError(f"{arch.name} has no *ForSequenceClassification class in transformers, so a reward model "
                         f"(scalar head) cannot be written as it; families that have one: {', '.join(SEQ_CLS)}")
    return arch.seq_cls


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


__all__ = ["ARCHS", "HARMLESS", "SEQ_CLS", "Arch", "HFConfig", "TensorMap", "check_consumed", "default_for", "field",
           "get", "head_of", "hf_name"]

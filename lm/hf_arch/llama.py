"""LLaMA-family layouts: LLaMA (1/2/3.x), Baichuan (W_pack; ALiBi at 13B) and GLM-4 (transformers' Glm)."""
from __future__ import annotations

from lm.config import ModelConfig
from lm.hf_arch.core import Arch, field, hf_rope, llama_like_from, llama_like_to, llama_tensors, require, rope

# --- LLaMA ---------------------------------------------------------------------------------------------

def _llama_from(hf: dict) -> dict:
    rotary = rope(hf)
    require(rotary["rope_fraction"] == 1.0, hf, "partial_rotary_factor is not applied by LlamaForCausalLM")
    bias = bool(field(hf, "attention_bias", default=False))
    return dict(llama_like_from(hf), max_len=field(hf, "max_position_embeddings", default=2048), position="rope",
                **rotary, qkv_bias=bias, out_bias=bias, mlp_bias=bool(field(hf, "mlp_bias", default=False)))


def _llama_to(cfg: ModelConfig) -> dict:
    return dict(llama_like_to(cfg), model_type="llama", max_position_embeddings=cfg.max_len,
                attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, **hf_rope(cfg))


# --- Baichuan (remote code): 7B is LLaMA with W_pack; 13B swaps RoPE for ALiBi ---------------------------

def _baichuan_from(hf: dict) -> dict:
    # The 7B configs carry max_position_embeddings (RoPE); the 13B ones only model_max_length (ALiBi).
    rope = "max_position_embeddings" in hf
    kw = dict(llama_like_from(hf), qkv_bias=False, out_bias=False, mlp_bias=False,
              position="rope" if rope else "alibi",
              max_len=field(hf, "max_position_embeddings", "model_max_length", default=4096))
    return dict(kw, rope_theta=float(hf.get("rope_theta", 10000.0))) if rope else kw


def _baichuan_to(cfg: ModelConfig) -> dict:
    out = dict(llama_like_to(cfg), model_type="baichuan", model_max_length=cfg.max_len)
    if cfg.position == "rope":
        out.update(max_position_embeddings=cfg.max_len, rope_theta=cfg.rope_theta)
    return out


# --- GLM-4 (transformers' GlmForCausalLM) --------------------------------------------------------------

def _glm_from(hf: dict) -> dict:
    return dict(llama_like_from(hf), max_len=field(hf, "max_position_embeddings", default=2048), position="rope",
                **rope(hf, fraction_default=0.5), rope_interleaved=True,
                qkv_bias=bool(field(hf, "attention_bias", default=True)), out_bias=False, mlp_bias=False)


def _glm_to(cfg: ModelConfig) -> dict:
    return dict(llama_like_to(cfg), model_type="glm", max_position_embeddings=cfg.max_len,
                attention_bias=cfg.qkv_bias, **hf_rope(cfg, partial=True))


def _baichuan_tensors(cfg):
    return llama_tensors(cfg, qkv="pack")


def _glm_tensors(cfg):
    return llama_tensors(cfg, gate_up=True)


ARCHS = [
    Arch("LlamaForCausalLM", _llama_from, _llama_to, llama_tensors, "model."),
    Arch("BaichuanForCausalLM", _baichuan_from, _baichuan_to, _baichuan_tensors, "model."),
    Arch("BaiChuanForCausalLM", _baichuan_from, _baichuan_to, _baichuan_tensors, "model."),
    Arch("GlmForCausalLM", _glm_from, _glm_to, _glm_tensors, "model."),
]

"""LLaMA-family layouts: LLaMA (1/2/3.x, RoPE scaling), Mistral, Qwen2, Qwen3, Phi-3, Baichuan (W_pack;
ALiBi at 13B) and GLM-4 (transformers' Glm).

Defaults for absent config.json keys are the transformers config classes' (Mistral's 4096-token window,
Qwen's 32 K/V heads, Qwen3's head_dim 128, Phi-3's eps 1e-5), so a hand-written config means what it means there.
"""
from __future__ import annotations

from lm.config import ModelConfig
from lm.hf_arch.core import (Arch, field, hf_rope, layer_types, llama_like_from, llama_like_to, llama_tensors,
                             or_default, require, rope, window_pattern)


def _full_rope(hf: dict) -> dict:
    """RoPE fields of an architecture that rotates whole heads (its rotary ignores partial_rotary_factor)."""
    rotary = rope(hf)
    require(rotary["rope_fraction"] == 1.0, hf, f"partial_rotary_factor={rotary['rope_fraction']} is not applied by "
            "this architecture (it rotates whole heads)")
    return rotary


# --- LLaMA ---------------------------------------------------------------------------------------------

def _llama_from(hf: dict) -> dict:
    bias = bool(field(hf, "attention_bias", default=False))
    return dict(llama_like_from(hf), max_len=field(hf, "max_position_embeddings", default=2048), position="rope",
                **_full_rope(hf), qkv_bias=bias, out_bias=bias, mlp_bias=bool(field(hf, "mlp_bias", default=False)))


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


# --- Mistral: LLaMA without biases, a sliding window on every layer (null: none) -------------------------

def _mistral_from(hf: dict) -> dict:
    window = or_default(hf, "sliding_window", 4096)
    return dict(llama_like_from(hf, kv_heads=8), max_len=field(hf, "max_position_embeddings", default=131072),
                position="rope", **_full_rope(hf), sliding_window=window)


def _mistral_to(cfg: ModelConfig) -> dict:
    return dict(llama_like_to(cfg), model_type="mistral", max_position_embeddings=cfg.max_len,
                sliding_window=cfg.sliding_window, **hf_rope(cfg))


# --- Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorms): windows on the layers `layer_types` names ----

def _qwen_window(hf: dict, n_layers: int) -> dict:
    """sliding_window + window_pattern as Qwen2Config resolves them: no window unless use_sliding_window;
    `layer_types` if given, else the layers from `max_window_layers` on are local."""
    window = or_default(hf, "sliding_window", 4096)
    window = window if field(hf, "use_sliding_window", default=False) else None
    first = field(hf, "max_window_layers", default=28)
    types = hf.get("layer_types") or ["sliding_attention" if window is not None and i >= first else "full_attention"
                                      for i in range(n_layers)]
    pattern = window_pattern(types, n_layers, hf)
    if "L" not in pattern:
        return {}
    require(window is not None, hf, f"layer_types has sliding layers but there is no window "
            f"(use_sliding_window={hf.get('use_sliding_window')}, sliding_window={hf.get('sliding_window')})")
    return dict(sliding_window=window, window_pattern=pattern)


def _qwen_window_to(cfg: ModelConfig) -> dict:
    types = layer_types(cfg)
    first_local = next((i for i, t in enumerate(types) if t == "sliding_attention"), cfg.n_layers)
    return dict(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                max_window_layers=first_local, layer_types=types)


def _qwen2_from(hf: dict) -> dict:
    kw = llama_like_from(hf, kv_heads=32)
    return dict(kw, max_len=field(hf, "max_position_embeddings", default=32768), position="rope", **_full_rope(hf),
                qkv_bias=True, **_qwen_window(hf, kw["n_layers"]))


def _qwen2_to(cfg: ModelConfig) -> dict:
    return dict(llama_like_to(cfg), model_type="qwen2", max_position_embeddings=cfg.max_len, **hf_rope(cfg),
                **_qwen_window_to(cfg))


def _qwen3_from(hf: dict) -> dict:
    kw = llama_like_from(hf, kv_heads=32, head_dim=128)
    bias = bool(field(hf, "attention_bias", default=False))
    return dict(kw, max_len=field(hf, "max_position_embeddings", default=32768), position="rope", **_full_rope(hf),
                qk_norm=True, qkv_bias=bias, out_bias=bias, **_qwen_window(hf, kw["n_layers"]))


def _qwen3_to(cfg: ModelConfig) -> dict:
    return dict(llama_like_to(cfg), model_type="qwen3", max_position_embeddings=cfg.max_len,
                attention_bias=cfg.qkv_bias, **hf_rope(cfg), **_qwen_window_to(cfg))


# --- Phi-3: fused qkv_proj and gate_up_proj, partial rotary, a window on every layer ----------------------

def _phi3_from(hf: dict) -> dict:
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    require(kind == "default", hf, f"rope_type={kind!r}: Phi-3 takes 'default' or 'longrope' (and reads 'su' and "
            "'yarn' as 'longrope'); LongRoPE's per-frequency short/long factors are not implemented")
    hf.get("original_max_position_embeddings")  # read by LongRoPE only
    return dict(llama_like_from(hf, eps=1e-5), max_len=field(hf, "max_position_embeddings", default=4096),
                position="rope", **rope(hf), sliding_window=hf.get("sliding_window"))


def _phi3_to(cfg: ModelConfig) -> dict:
    return dict(llama_like_to(cfg), model_type="phi3", max_position_embeddings=cfg.max_len,
                original_max_position_embeddings=cfg.max_len, sliding_window=cfg.sliding_window,
                **hf_rope(cfg, partial=True))


def _phi3_tensors(cfg):
    return llama_tensors(cfg, qkv="qkv_proj", gate_up=True)


def _baichuan_tensors(cfg):
    return llama_tensors(cfg, qkv="W_pack")


def _glm_tensors(cfg):
    return llama_tensors(cfg, gate_up=True)


ARCHS = [
    Arch("LlamaForCausalLM", _llama_from, _llama_to, llama_tensors, "model.",
         seq_cls="LlamaForSequenceClassification"),
    Arch("MistralForCausalLM", _mistral_from, _mistral_to, llama_tensors, "model.",
         seq_cls="MistralForSequenceClassification"),
    Arch("Qwen2ForCausalLM", _qwen2_from, _qwen2_to, llama_tensors, "model.",
         seq_cls="Qwen2ForSequenceClassification"),
    Arch("Qwen3ForCausalLM", _qwen3_from, _qwen3_to, llama_tensors, "model.",
         seq_cls="Qwen3ForSequenceClassification"),
    Arch("Phi3ForCausalLM", _phi3_from, _phi3_to, _phi3_tensors, "model.",
         seq_cls="Phi3ForSequenceClassification"),
    Arch("BaichuanForCausalLM", _baichuan_from, _baichuan_to, _baichuan_tensors, "model."),
    Arch("BaiChuanForCausalLM", _baichuan_from, _baichuan_to, _baichuan_tensors, "model."),
    Arch("GlmForCausalLM", _glm_from, _glm_to, _glm_tensors, "model.",
         seq_cls="GlmForSequenceClassification"),
]

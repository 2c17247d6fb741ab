"""ChatGLM checkpoint layouts (remote-code architectures `ChatGLMModel` / `ChatGLMForConditionalGeneration`).

ChatGLM-6B and ChatGLM2/3-6B share the architecture names and `model_type` ("chatglm"): a config.json is told
apart by its keys (v2/v3 have `padded_vocab_size`, `ffn_hidden_size`, `multi_query_attention`, ...) and a
`ModelConfig` by its parts (DeepNorm / 2D RoPE is ChatGLM-6B; anything else is written as ChatGLM2).
"""
from __future__ import annotations

from lm.config import ModelConfig
from lm.hf_arch.core import O, QKV, WG, WI, WO, Arch, TensorMap, embed_and_head, field, linear, norm, require

# --- ChatGLM-6B (remote code): DeepNorm, GELU MLP, 2D RoPE, prefix-LM ------------------------------------
# Its config.json does not set tie_word_embeddings, so transformers' default (tied) applies.

def _chatglm_from(hf: dict) -> dict:
    require(hf.get("position_encoding_2d", True), hf, "position_encoding_2d=False")
    require(not hf.get("pre_seq_len"), hf, "P-tuning prefix encoder (pre_seq_len)")
    require(not hf.get("quantization_bit"), hf, f"quantization_bit={hf.get('quantization_bit')} (quantised weights)")
    hf.get("prefix_projection")  # only used with pre_seq_len
    d = field(hf, "hidden_size")
    return dict(vocab_size=field(hf, "vocab_size"), d_model=d, n_layers=field(hf, "num_layers"),
                n_heads=field(hf, "num_attention_heads"), d_ff=field(hf, "inner_hidden_size", default=4 * d),
                max_len=field(hf, "max_sequence_length", default=2048), norm="layernorm",
                norm_eps=float(field(hf, "layernorm_epsilon", default=1e-5)), residual="deepnorm", mlp="gelu",
                gelu_approximate=True, position="rope2d", mask="prefix", qkv_bias=True, out_bias=True,
                mlp_bias=True, tie_embeddings=bool(field(hf, "tie_word_embeddings", default=True)))


def _chatglm_to(cfg: ModelConfig) -> dict:
    return dict(model_type="chatglm", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, inner_hidden_size=cfg.d_ff, max_sequence_length=cfg.max_len,
                layernorm_epsilon=cfg.norm_eps, position_encoding_2d=True, tie_word_embeddings=cfg.tie_embeddings)


def _chatglm_tensors(cfg: ModelConfig) -> list[TensorMap]:
    p = "transformer.layers.{i}."
    maps = embed_and_head("transformer.word_embeddings.weight", "transformer.final_layernorm", cfg)
    maps += norm(p + "input_layernorm", "layers/attn_norm", cfg)
    maps += norm(p + "post_attention_layernorm", "layers/mlp_norm", cfg)
    maps += linear(p + "attention.query_key_value", QKV, True, per_head=True)
    maps += linear(p + "attention.dense", (O,), True, n_in=2)
    maps += linear(p + "mlp.dense_h_to_4h", (WI,), True) + linear(p + "mlp.dense_4h_to_h", (WO,), True)
    return maps


# --- ChatGLM2/3-6B (remote code): GLM-4's math (transformers' Glm) -----------------------------------------
# RMSNorm, SwiGLU with a fused [gate; up] projection, interleaved RoPE on the first half of each head with base
# 10000 * rope_ratio (ChatGLM3-6B-32k: 50), multi-query groups, fused [q; k; v] with a bias, causal, untied head.

_V2_KEYS = ("padded_vocab_size", "ffn_hidden_size", "multi_query_attention", "kv_channels")


def _chatglm2_from(hf: dict) -> dict:
    require(not hf.get("quantization_bit"), hf, f"quantization_bit={hf.get('quantization_bit')} (quantised weights)")
    require(not hf.get("pre_seq_len"), hf, "P-tuning prefix encoder (pre_seq_len)")
    hf.get("prefix_projection")  # only used with pre_seq_len
    require(not hf.get("apply_residual_connection_post_layernorm", False), hf,
            "apply_residual_connection_post_layernorm=True")
    require(hf.get("post_layer_norm", True), hf, "post_layer_norm=False (no final norm)")
    # multi_query_attention=False lays query_key_value out per head instead; no published checkpoint does.
    require(hf.get("multi_query_attention", False), hf, "multi_query_attention=False (per-head q/k/v layout)")
    # Numerics-only switches of the reference code (it also ignores original_rope); its output layer is never
    # tied to the embedding, whatever tie_word_embeddings says; vocab_size is the tokenizer's size.
    for key in ("apply_query_key_layer_scaling", "attention_softmax_in_fp32", "fp32_residual_connection",
                "bias_dropout_fusion", "original_rope", "tie_word_embeddings", "vocab_size"):
        hf.get(key)
    n_layers = field(hf, "num_layers")
    require(hf.get("num_hidden_layers", n_layers) == n_layers, hf,
            f"num_hidden_layers={hf.get('num_hidden_layers')} differs from num_layers={n_layers}")
    d, h = field(hf, "hidden_size"), field(hf, "num_attention_heads")
    head_dim, groups = field(hf, "kv_channels", default=d // h), field(hf, "multi_query_group_num", default=1)
    linear_bias = bool(field(hf, "add_bias_linear", default=False))
    return dict(vocab_size=field(hf, "padded_vocab_size"), d_model=d, n_layers=n_layers, n_heads=h,
                n_kv_heads=None if groups == h else groups, head_dim=None if head_dim == d // h else head_dim,
                d_ff=field(hf, "ffn_hidden_size"), max_len=field(hf, "seq_length", default=2048),
                norm="rmsnorm" if field(hf, "rmsnorm", default=True) else "layernorm",
                norm_eps=float(field(hf, "layernorm_epsilon", default=1e-5)), mlp="swiglu", position="rope",
                rope_theta=10000.0 * float(field(hf, "rope_ratio", default=1.0)), rope_fraction=0.5,
                rope_interleaved=True, qkv_bias=linear_bias or bool(field(hf, "add_qkv_bias", default=False)),
                out_bias=linear_bias, mlp_bias=linear_bias, tie_embeddings=False)


def _chatglm2_to(cfg: ModelConfig) -> dict:
    return dict(model_type="chatglm", padded_vocab_size=cfg.vocab_size, vocab_size=cfg.vocab_size,
                hidden_size=cfg.d_model, num_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                kv_channels=cfg.dim_per_head, multi_query_attention=True, multi_query_group_num=cfg.kv_heads,
                ffn_hidden_size=cfg.d_ff, seq_length=cfg.max_len, rmsnorm=cfg.norm == "rmsnorm",
                layernorm_epsilon=cfg.norm_eps, rope_ratio=cfg.rope_theta / 10000.0, original_rope=True,
                add_bias_linear=cfg.out_bias, add_qkv_bias=cfg.qkv_bias,
                apply_residual_connection_post_layernorm=False, post_layer_norm=True,
                apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True, fp32_residual_connection=False,
                bias_dropout_fusion=True, hidden_dropout=0.0, attention_dropout=0.0, quantization_bit=0,
                pre_seq_len=None, prefix_projection=False, tie_word_embeddings=False)


def _chatglm2_tensors(cfg: ModelConfig) -> list[TensorMap]:
    p = "transformer.encoder.layers.{i}."
    maps = embed_and_head("transformer.embedding.word_embeddings.weight", "transformer.encoder.final_layernorm", cfg,
                          head="transformer.output_layer")
    maps += norm(p + "input_layernorm", "layers/attn_norm", cfg)
    maps += norm(p + "post_attention_layernorm", "layers/mlp_norm", cfg)
    # [q (H*D); k (G*D); v (G*D)], each head's dims contiguous.
    maps += linear(p + "self_attention.query_key_value", QKV, cfg.qkv_bias)
    maps += linear(p + "self_attention.dense", (O,), cfg.out_bias, n_in=2)
    maps += linear(p + "mlp.dense_h_to_4h", (WG, WI), cfg.mlp_bias)
    maps += linear(p + "mlp.dense_4h_to_h", (WO,), cfg.mlp_bias)
    return maps


# --- One architecture name for both generations ----------------------------------------------------------

def _is_v1(cfg: ModelConfig) -> bool:
    return cfg.residual == "deepnorm" or cfg.position == "rope2d"


def _any_from(hf: dict) -> dict:
    return _chatglm2_from(hf) if any(k in hf for k in _V2_KEYS) else _chatglm_from(hf)


def _any_to(cfg: ModelConfig) -> dict:
    return _chatglm_to(cfg) if _is_v1(cfg) else _chatglm2_to(cfg)


def _any_tensors(cfg: ModelConfig) -> list[TensorMap]:
    return _chatglm_tensors(cfg) if _is_v1(cfg) else _chatglm2_tensors(cfg)


ARCHS = [
    Arch("ChatGLMForConditionalGeneration", _any_from, _any_to, _any_tensors, "transformer."),
    Arch("ChatGLMModel", _any_from, _any_to, _any_tensors, "transformer."),
]

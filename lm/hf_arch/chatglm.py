"""ChatGLM checkpoint layouts (remote-code architectures `ChatGLMModel` / `ChatGLMForConditionalGeneration`)."""
from __future__ import annotations

from lm.config import ModelConfig
from lm.hf_arch.core import O, QKV, WI, WO, Arch, TensorMap, embed_and_head, field, linear, norm, require

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


ARCHS = [
    Arch("ChatGLMForConditionalGeneration", _chatglm_from, _chatglm_to, _chatglm_tensors, "transformer."),
    Arch("ChatGLMModel", _chatglm_from, _chatglm_to, _chatglm_tensors, "transformer."),
]

"""GPT-style layouts with LayerNorm and biases: BLOOM (ALiBi) and GPT-2 (learned positions, Conv1D)."""
from __future__ import annotations

from lm.config import ModelConfig
from lm.hf_arch.core import O, QKV, WI, WO, Arch, TensorMap, embed_and_head, field, linear, norm, require

# --- BLOOM ---------------------------------------------------------------------------------------------

def _bloom_from(hf: dict) -> dict:
    require(not hf.get("apply_residual_connection_post_layernorm", False), hf,
             "apply_residual_connection_post_layernorm=True")
    d = field(hf, "hidden_size", "n_embed")
    return dict(vocab_size=field(hf, "vocab_size"), d_model=d, n_layers=field(hf, "n_layer", "num_hidden_layers"),
                n_heads=field(hf, "n_head", "num_attention_heads"), d_ff=4 * d, max_len=hf.get("seq_length", 2048),
                norm="layernorm", norm_eps=float(field(hf, "layer_norm_epsilon", default=1e-5)), mlp="gelu",
                gelu_approximate=True, position="alibi", embed_norm=True, qkv_bias=True, out_bias=True,
                mlp_bias=True, tie_embeddings=bool(field(hf, "tie_word_embeddings", default=True)))


def _bloom_to(cfg: ModelConfig) -> dict:
    # BLOOM has no position limit of its own (ALiBi); seq_length keeps our max_len.
    return dict(model_type="bloom", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, n_layer=cfg.n_layers,
                n_head=cfg.n_heads, layer_norm_epsilon=cfg.norm_eps, seq_length=cfg.max_len,
                apply_residual_connection_post_layernorm=False, tie_word_embeddings=cfg.tie_embeddings)


def _bloom_tensors(cfg: ModelConfig) -> list[TensorMap]:
    p = "transformer.h.{i}."
    maps = embed_and_head("transformer.word_embeddings.weight", "transformer.ln_f", cfg)
    maps += norm("transformer.word_embeddings_layernorm", "embed_norm", cfg)
    maps += norm(p + "input_layernorm", "layers/attn_norm", cfg)
    maps += norm(p + "post_attention_layernorm", "layers/mlp_norm", cfg)
    maps += linear(p + "self_attention.query_key_value", QKV, True, per_head=True)
    maps += linear(p + "self_attention.dense", (O,), True, n_in=2)
    maps += linear(p + "mlp.dense_h_to_4h", (WI,), True) + linear(p + "mlp.dense_4h_to_h", (WO,), True)
    return maps


# --- GPT-2 ---------------------------------------------------------------------------------------------

_GPT2_ACTS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}


def _gpt2_from(hf: dict) -> dict:
    act = field(hf, "activation_function", default="gelu_new")
    require(act in _GPT2_ACTS, hf, f"activation_function={act!r} (supported: {sorted(_GPT2_ACTS)})")
    require(not hf.get("add_cross_attention", False), hf, "add_cross_attention=True")
    require(hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx", False), hf,
             "attention scaling other than 1/sqrt(head_dim)")
    d = field(hf, "n_embd", "hidden_size")
    return dict(vocab_size=field(hf, "vocab_size"), d_model=d, n_layers=field(hf, "n_layer", "num_hidden_layers"),
                n_heads=field(hf, "n_head", "num_attention_heads"), d_ff=field(hf, "n_inner", default=4 * d),
                max_len=field(hf, "n_positions", "max_position_embeddings", default=1024), norm="layernorm",
                norm_eps=float(field(hf, "layer_norm_epsilon", default=1e-5)), mlp="gelu",
                gelu_approximate=_GPT2_ACTS[act], position="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                tie_embeddings=bool(field(hf, "tie_word_embeddings", default=True)))


def _gpt2_to(cfg: ModelConfig) -> dict:
    return dict(model_type="gpt2", vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                n_head=cfg.n_heads, n_inner=cfg.d_ff, n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
                activation_function="gelu_new" if cfg.gelu_approximate else "gelu",
                tie_word_embeddings=cfg.tie_embeddings)


def _gpt2_tensors(cfg: ModelConfig) -> list[TensorMap]:
    p = "transformer.h.{i}."
    maps = embed_and_head("transformer.wte.weight", "transformer.ln_f", cfg)
    maps.append(TensorMap("transformer.wpe.weight", ("pos_embed",)))
    maps += norm(p + "ln_1", "layers/attn_norm", cfg) + norm(p + "ln_2", "layers/mlp_norm", cfg)
    maps += linear(p + "attn.c_attn", QKV, True, kind="conv1d")
    maps += linear(p + "attn.c_proj", (O,), True, kind="conv1d", n_in=2)
    maps += linear(p + "mlp.c_fc", (WI,), True, kind="conv1d") + linear(p + "mlp.c_proj", (WO,), True,
                                                                           kind="conv1d")
    return maps


ARCHS = [
    Arch("BloomForCausalLM", _bloom_from, _bloom_to, _bloom_tensors, "transformer."),
    Arch("GPT2LMHeadModel", _gpt2_from, _gpt2_to, _gpt2_tensors, "transformer."),
]

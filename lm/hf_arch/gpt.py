"""GPT-style layouts with LayerNorm and biases: BLOOM (ALiBi), GPT-2 (learned positions, Conv1D), GPT-NeoX /
Pythia (parallel residual, partial RoPE) and OPT (ReLU, learned positions offset by 2)."""
from __future__ import annotations

from lm.config import ModelConfig
from lm.hf_arch.core import (O, QKV, WI, WO, Arch, TensorMap, embed_and_head, field, hf_rope, linear, norm, require,
                             rope)

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


# --- GPT-NeoX / Pythia --------------------------------------------------------------------------------

def _neox_from(hf: dict) -> dict:
    act = field(hf, "hidden_act", default="gelu")
    require(act in _GPT2_ACTS, hf, f"hidden_act={act!r} (supported: {sorted(_GPT2_ACTS)})")
    rotary = rope(hf, fraction_default=float(field(hf, "rotary_pct", default=0.25)))
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    base = hf.get("rotary_emb_base")  # the base's name before transformers 5 (read even when rope_parameters wins)
    if "rope_theta" not in rp and base is not None:
        rotary["rope_theta"] = float(base)
    bias = bool(field(hf, "attention_bias", default=True))
    parallel = bool(field(hf, "use_parallel_residual", default=True))
    return dict(vocab_size=field(hf, "vocab_size"), d_model=field(hf, "hidden_size"),
                n_layers=field(hf, "num_hidden_layers"), n_heads=field(hf, "num_attention_heads"),
                d_ff=field(hf, "intermediate_size"), max_len=field(hf, "max_position_embeddings", default=2048),
                norm="layernorm", norm_eps=float(field(hf, "layer_norm_eps", default=1e-5)),
                residual="parallel" if parallel else "prenorm", mlp="gelu", gelu_approximate=_GPT2_ACTS[act],
                position="rope", **rotary, qkv_bias=bias, out_bias=bias, mlp_bias=True,
                tie_embeddings=bool(field(hf, "tie_word_embeddings", default=False)))


def _neox_to(cfg: ModelConfig) -> dict:
    # rotary_pct / rotary_emb_base for readers older than transformers 5.
    return dict(model_type="gpt_neox", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff,
                hidden_act="gelu_new" if cfg.gelu_approximate else "gelu", max_position_embeddings=cfg.max_len,
                layer_norm_eps=cfg.norm_eps, use_parallel_residual=cfg.residual == "parallel",
                attention_bias=cfg.qkv_bias, tie_word_embeddings=cfg.tie_embeddings, rotary_pct=cfg.rope_fraction,
                rotary_emb_base=cfg.rope_theta, **hf_rope(cfg, partial=True))


def _neox_tensors(cfg: ModelConfig) -> list[TensorMap]:
    p = "gpt_neox.layers.{i}."
    maps = embed_and_head("gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm", cfg, head="embed_out")
    maps += norm(p + "input_layernorm", "layers/attn_norm", cfg)
    maps += norm(p + "post_attention_layernorm", "layers/mlp_norm", cfg)
    # query_key_value's output is [H, (q, k, v), D], as in BLOOM.
    maps += linear(p + "attention.query_key_value", QKV, cfg.qkv_bias, per_head=True)
    maps += linear(p + "attention.dense", (O,), cfg.out_bias, n_in=2)
    maps += linear(p + "mlp.dense_h_to_4h", (WI,), True) + linear(p + "mlp.dense_4h_to_h", (WO,), True)
    return maps


# --- OPT (pre-LN sizes: 125M and 1.3B up; OPT-350M's post-LN and projected embeddings are refused) ---------

def _opt_from(hf: dict) -> dict:
    d = field(hf, "hidden_size")
    require(hf.get("do_layer_norm_before", True), hf, "do_layer_norm_before=False (post-LN, as in OPT-350M)")
    require(field(hf, "word_embed_proj_dim", default=d) == d, hf,
            f"word_embed_proj_dim={hf.get('word_embed_proj_dim')} differs from hidden_size={d} (project_in/out)")
    require(not hf.get("_remove_final_layer_norm", False), hf, "_remove_final_layer_norm=True")
    require(hf.get("layer_norm_elementwise_affine", True), hf, "layer_norm_elementwise_affine=False")
    act = field(hf, "activation_function", default="relu")
    require(act == "relu", hf, f"activation_function={act!r} (supported: 'relu')")
    bias = bool(field(hf, "enable_bias", default=True))
    # OPT's LayerNorms keep torch's eps (1e-5); its config has no key for it.
    return dict(vocab_size=field(hf, "vocab_size"), d_model=d, n_layers=field(hf, "num_hidden_layers"),
                n_heads=field(hf, "num_attention_heads"), d_ff=field(hf, "ffn_dim"),
                max_len=field(hf, "max_position_embeddings", default=2048), norm="layernorm", norm_eps=1e-5,
                mlp="relu", position="learned", pos_offset=2, qkv_bias=bias, out_bias=bias, mlp_bias=bias,
                tie_embeddings=bool(field(hf, "tie_word_embeddings", default=True)))


def _opt_to(cfg: ModelConfig) -> dict:
    return dict(model_type="opt", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, word_embed_proj_dim=cfg.d_model,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, ffn_dim=cfg.d_ff,
                max_position_embeddings=cfg.max_len, activation_function="relu", do_layer_norm_before=True,
                _remove_final_layer_norm=False, layer_norm_elementwise_affine=True, enable_bias=cfg.qkv_bias,
                tie_word_embeddings=cfg.tie_embeddings)


def _opt_tensors(cfg: ModelConfig) -> list[TensorMap]:
    p = "model.decoder.layers.{i}."
    maps = embed_and_head("model.decoder.embed_tokens.weight", "model.decoder.final_layer_norm", cfg)
    maps.append(TensorMap("model.decoder.embed_positions.weight", ("pos_embed",)))  # [max_len + 2, d]
    maps += norm(p + "self_attn_layer_norm", "layers/attn_norm", cfg)
    maps += norm(p + "final_layer_norm", "layers/mlp_norm", cfg)
    for name, ours in zip("qkv", QKV):
        maps += linear(f"{p}self_attn.{name}_proj", (ours,), cfg.qkv_bias)
    maps += linear(p + "self_attn.out_proj", (O,), cfg.out_bias, n_in=2)
    maps += linear(p + "fc1", (WI,), cfg.mlp_bias) + linear(p + "fc2", (WO,), cfg.mlp_bias)
    return maps


ARCHS = [
    Arch("BloomForCausalLM", _bloom_from, _bloom_to, _bloom_tensors, "transformer.",
         seq_cls="BloomForSequenceClassification"),
    Arch("GPT2LMHeadModel", _gpt2_from, _gpt2_to, _gpt2_tensors, "transformer.",
         seq_cls="GPT2ForSequenceClassification"),
    Arch("GPTNeoXForCausalLM", _neox_from, _neox_to, _neox_tensors, "gpt_neox.",
         seq_cls="GPTNeoXForSequenceClassification"),
    Arch("OPTForCausalLM", _opt_from, _opt_to, _opt_tensors, "model.",
         seq_cls="OPTForSequenceClassification"),
]

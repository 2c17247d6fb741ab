"""Gemma layouts: Gemma2 ((1 + w) RMSNorms before and after each sub-layer, sqrt(d) embedding scale, soft-capped
attention and output logits, local and global layers alternating) and Gemma3's text model (`Gemma3ForCausalLM`:
adds (1 + w) q/k norms, drops the soft-caps, five local layers per global one, each kind with its RoPE base)."""
from __future__ import annotations

from lm.config import ModelConfig
from lm.hf_arch.core import (O, QKV, WG, WI, WO, Arch, TensorMap, embed_and_head, field, gated_act, hf_act, hf_rope,
                             layer_types, linear, norm, or_default, require, rope, window_pattern)


def _number(x: float):
    """`x` as an int when it is one (transformers' Gemma configs type query_pre_attn_scalar as int)."""
    return int(x) if float(x).is_integer() else x


def _gemma_from(hf: dict, *, every: int, caps: bool, max_len: int) -> dict:
    """Fields Gemma2 and Gemma3 read alike. For absent keys: a global layer every `every` layers, soft-caps
    (50 on attention, 30 on the output) if `caps`, and max_position_embeddings `max_len`."""
    require(not hf.get("use_bidirectional_attention"), hf, "use_bidirectional_attention=True (bidirectional "
            "attention is not implemented; our Gemma models are causal)")
    hf.get("hidden_act")  # older Gemma2 configs repeat the activation here; transformers reads hidden_activation
    hf.get("cache_implementation")  # a generation setting ("hybrid")
    n_layers = field(hf, "num_hidden_layers")
    window = or_default(hf, "sliding_window", 4096)
    require(hf.get("sliding_window_size", window) == window, hf,
            f"sliding_window_size={hf.get('sliding_window_size')} differs from sliding_window={window}")
    types = hf.get("layer_types") or ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                                      for i in range(n_layers)]
    pattern = window_pattern(types, n_layers, hf)
    if "L" not in pattern:
        window, pattern = None, "L"
    require(window is not None or "L" not in pattern, hf, "sliding_attention layers without sliding_window")
    d, h = field(hf, "hidden_size"), field(hf, "num_attention_heads")
    head_dim, n_kv = field(hf, "head_dim", default=256), field(hf, "num_key_value_heads", default=h)
    bias = bool(field(hf, "attention_bias", default=False))
    attn_cap = or_default(hf, "attn_logit_softcapping", 50.0 if caps else None)
    final_cap = or_default(hf, "final_logit_softcapping", 30.0 if caps else None)
    return dict(vocab_size=field(hf, "vocab_size"), d_model=d, n_layers=n_layers, n_heads=h,
                n_kv_heads=None if n_kv == h else n_kv, head_dim=None if head_dim == d // h else head_dim,
                d_ff=field(hf, "intermediate_size"), max_len=field(hf, "max_position_embeddings", default=max_len),
                norm="rmsnorm", norm_eps=float(field(hf, "rms_norm_eps", default=1e-6)), norm_scale_offset=1.0,
                post_norms=True, embed_scale=True, **gated_act(hf, "hidden_activation", default="gelu_pytorch_tanh"),
                position="rope", sliding_window=window, window_pattern=pattern,
                attn_softcap=None if attn_cap is None else float(attn_cap),
                final_softcap=None if final_cap is None else float(final_cap),
                query_pre_attn_scalar=float(field(hf, "query_pre_attn_scalar", default=256)),
                qkv_bias=bias, out_bias=bias, mlp_bias=False,
                tie_embeddings=bool(field(hf, "tie_word_embeddings", default=True)))


def _gemma_to(cfg: ModelConfig) -> dict:
    # transformers builds a sliding-window mask even when every layer is global, so sliding_window is never null.
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
                intermediate_size=cfg.d_ff, hidden_activation=hf_act(cfg), max_position_embeddings=cfg.max_len,
                rms_norm_eps=cfg.norm_eps, attention_bias=cfg.qkv_bias,
                query_pre_attn_scalar=_number(cfg.query_pre_attn_scalar or cfg.dim_per_head),
                attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
                sliding_window=cfg.sliding_window or cfg.max_len, layer_types=layer_types(cfg),
                use_bidirectional_attention=False, tie_word_embeddings=cfg.tie_embeddings)


def _whole_heads(rotary: dict, hf: dict) -> dict:
    require(rotary["rope_fraction"] == 1.0, hf, f"partial_rotary_factor={rotary['rope_fraction']} (Gemma rotates "
            "whole heads)")
    return rotary


# --- Gemma2 --------------------------------------------------------------------------------------------

def _gemma2_from(hf: dict) -> dict:
    return dict(_gemma_from(hf, every=2, caps=True, max_len=8192), **_whole_heads(rope(hf), hf))


def _gemma2_to(cfg: ModelConfig) -> dict:
    return dict(_gemma_to(cfg), model_type="gemma2", **hf_rope(cfg))


# --- Gemma3 (text) -------------------------------------------------------------------------------------

def _gemma3_rope(hf: dict) -> dict:
    """RoPE of the global layers plus the local layers' base, from per-layer-type `rope_parameters`
    (transformers 5) or `rope_theta` / `rope_local_base_freq` / `rope_scaling` (older configs, where the
    scaling is the global layers'). Local and global layers may differ in base only."""
    rp = hf.get("rope_parameters") or {}
    if "full_attention" in rp or "sliding_attention" in rp:
        full, local = dict(rp.get("full_attention") or {}), dict(rp.get("sliding_attention") or {})
    else:
        full = dict(hf.get("rope_scaling") or rp)
        full.setdefault("rope_theta", hf.get("rope_theta", 1e6))
        local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    full.setdefault("rope_theta", 1e6)
    local.setdefault("rope_theta", 10000.0)
    where = {"architectures": hf.get("architectures")}
    out = _whole_heads(rope(dict(where, rope_parameters=full)), hf)
    local_out = rope(dict(where, rope_parameters=local))
    require(dict(local_out, rope_theta=0) == dict(out, rope_theta=0), hf,
            f"local layers' RoPE {local} differs from the global layers' {full} in more than its base (one scaling "
            "for all layers is implemented)")
    return dict(out, local_rope_theta=local_out["rope_theta"])


def _gemma3_from(hf: dict) -> dict:
    every = hf.get("sliding_window_pattern"), hf.get("_sliding_window_pattern")  # the older name, the newer
    every = every[0] or every[1] or 6
    kw = dict(_gemma_from(hf, every=every, caps=False, max_len=131072), **_gemma3_rope(hf), qk_norm=True)
    if kw["sliding_window"] is None or kw["local_rope_theta"] == kw["rope_theta"]:
        kw["local_rope_theta"] = None
    return kw


def _gemma3_to(cfg: ModelConfig) -> dict:
    full = hf_rope(cfg)["rope_parameters"]
    local = dict(full, rope_theta=cfg.local_rope_theta or cfg.rope_theta)
    return dict(_gemma_to(cfg), model_type="gemma3_text",
                rope_parameters={"full_attention": full, "sliding_attention": local})


def _gemma_tensors(cfg: ModelConfig) -> list[TensorMap]:
    p = "model.layers.{i}."
    maps = embed_and_head("model.embed_tokens.weight", "model.norm", cfg)
    # HF's post_attention_layernorm is the sandwich norm on the attention output, not the MLP's input norm.
    for hf_name, ours in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "attn_post_norm"),
                          ("pre_feedforward_layernorm", "mlp_norm"), ("post_feedforward_layernorm", "mlp_post_norm")):
        maps += norm(p + hf_name, f"layers/{ours}", cfg)
    for name, ours in zip("qkv", QKV):
        maps += linear(f"{p}self_attn.{name}_proj", (ours,), cfg.qkv_bias)
    if cfg.qk_norm:  # Gemma3
        maps += norm(p + "self_attn.q_norm", "layers/attn/q_norm", cfg)
        maps += norm(p + "self_attn.k_norm", "layers/attn/k_norm", cfg)
    maps += linear(p + "self_attn.o_proj", (O,), cfg.out_bias, n_in=2)
    maps += linear(p + "mlp.gate_proj", (WG,), False) + linear(p + "mlp.up_proj", (WI,), False)
    maps += linear(p + "mlp.down_proj", (WO,), False)
    return maps


ARCHS = [
    Arch("Gemma2ForCausalLM", _gemma2_from, _gemma2_to, _gemma_tensors, "model.",
         seq_cls="Gemma2ForSequenceClassification"),
    Arch("Gemma3ForCausalLM", _gemma3_from, _gemma3_to, _gemma_tensors, "model.",
         seq_cls="Gemma3TextForSequenceClassification"),
]

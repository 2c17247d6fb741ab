"""Hugging Face architectures as `ModelConfig` mappings: config.json fields and tensor names/layouts.

Each `Arch` says how an HF config maps onto `ModelConfig` fields (and back), and which HF tensor holds
which of our parameter leaves. A `TensorMap` covers fused tensors too (one HF tensor, several leaves):
LLaMA keeps q/k/v apart, Baichuan packs them in `W_pack`, GPT-2 in `c_attn` (Conv1D, `[in, out]`),
BLOOM and ChatGLM-6B interleave them per head in `query_key_value`, GLM-4 fuses gate and up projections.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np

from lm.config import ModelConfig

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor <-> one or more of our leaves (slash-joined paths, per-layer ones under `layers/`).

    hf: HF tensor name; `{i}` stands for the layer index (then every leaf carries a leading layer axis).
    kind: "same" (identical layout), "linear" (torch Linear weight `[out, in]`), "conv1d" (GPT-2 `[in, out]`)
      or "vector" (a bias, flattened). Our kernels are `[in..., out...]` with `n_in` input axes.
    per_head: fused pieces interleaved head by head (`[H, n_pieces, D]` on the output axis) instead of
      concatenated one after the other.
    """
    hf: str
    ours: tuple[str, ...]
    kind: str = "same"
    n_in: int = 1
    per_head: bool = False

    def _n_in(self):
        return 0 if self.kind == "vector" else self.n_in

    def hf_shape(self, shapes: list[Shape]) -> Shape:
        """Shape of the HF tensor given our per-layer leaf shapes."""
        if self.kind == "same":
            return tuple(shapes[0])
        n = self._n_in()
        n_inp = math.prod(shapes[0][:n])
        n_out = sum(math.prod(s[n:]) for s in shapes)
        return {"linear": (n_out, n_inp), "conv1d": (n_inp, n_out), "vector": (n_out,)}[self.kind]

    def to_hf(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Our per-layer leaves -> the HF tensor."""
        if self.kind == "same":
            return arrays[0]
        n = self._n_in()
        mats = [a.reshape(math.prod(a.shape[:n]), -1) for a in arrays]  # [in, out_j]
        if self.per_head:
            heads = arrays[0].shape[n]
            mat = np.stack([m.reshape(m.shape[0], heads, -1) for m in mats], axis=2).reshape(mats[0].shape[0], -1)
        else:
            mat = np.concatenate(mats, axis=1)
        return {"linear": mat.T, "conv1d": mat, "vector": mat[0]}[self.kind]

    def from_hf(self, tensor: np.ndarray, shapes: list[Shape]) -> list[np.ndarray]:
        """The HF tensor -> our per-layer leaves of `shapes` (views where the layout allows)."""
        if self.kind == "same":
            return [tensor.reshape(shapes[0])]
        n = self._n_in()
        mat = {"linear": lambda t: t.T, "conv1d": lambda t: t, "vector": lambda t: t[None]}[self.kind](tensor)
        if self.per_head:
            heads = shapes[0][n]
            split = mat.reshape(mat.shape[0], heads, len(shapes), -1)
            return [split[:, :, j].reshape(s) for j, s in enumerate(shapes)]
        ends = np.cumsum([math.prod(s[n:]) for s in shapes])
        return [m.reshape(s) for m, s in zip(np.split(mat, ends[:-1], axis=1), shapes)]


@dataclasses.dataclass(frozen=True)
class Arch:
    """An HF architecture: config mapping both ways and the tensor map for a given `ModelConfig`."""
    name: str
    from_hf: Callable[[dict], dict]  # HF config.json -> ModelConfig keyword arguments
    to_hf: Callable[[ModelConfig], dict]  # ModelConfig -> HF config.json (without "architectures")
    tensors: Callable[[ModelConfig], list[TensorMap]]
    base_prefix: str = ""  # prefix some checkpoints omit (the bare base model was saved)


_REQUIRED = object()


def field(hf: dict, *keys, default=_REQUIRED):
    """The first of `keys` present in an HF config; a missing required field is an error naming it."""
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    if default is _REQUIRED:
        raise ValueError(f"config.json has none of {list(keys)} (architecture {hf.get('architectures')})")
    return default


def _require(ok: bool, hf: dict, msg: str):
    if not ok:
        raise ValueError(f"unsupported {hf.get('architectures')} config: {msg}")


# Gated-MLP activations: HF name -> (our mlp kind, tanh-approximate GELU).
_GATED = {"silu": ("swiglu", True), "swish": ("swiglu", True), "gelu": ("geglu", False),
          "gelu_new": ("geglu", True), "gelu_pytorch_tanh": ("geglu", True)}


def _gated_act(hf: dict) -> dict:
    act = field(hf, "hidden_act", default="silu")
    _require(act in _GATED, hf, f"hidden_act={act!r} (supported: {sorted(_GATED)})")
    mlp, approx = _GATED[act]
    return dict(mlp=mlp, gelu_approximate=approx)


def _hf_act(cfg: ModelConfig) -> str:
    if cfg.mlp == "swiglu":
        return "silu"
    return "gelu_pytorch_tanh" if cfg.gelu_approximate else "gelu"


def _rope(hf: dict, fraction_default: float = 1.0) -> dict:
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    _require(kind == "default", hf, f"rope_type={kind!r} (only plain RoPE is supported)")
    return dict(rope_theta=float(rp.get("rope_theta", hf.get("rope_theta", 10000.0))),
                rope_fraction=float(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor",
                                                                               fraction_default))))


def _hf_rope(cfg: ModelConfig, partial: bool = False) -> dict:
    params = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if partial:
        params["partial_rotary_factor"] = cfg.rope_fraction
    return {"rope_parameters": params, "rope_theta": cfg.rope_theta}


def _llama_like_from(hf: dict) -> dict:
    """Fields shared by LLaMA, Baichuan and GLM-4 configs."""
    d, h = field(hf, "hidden_size"), field(hf, "num_attention_heads")
    head_dim, n_kv = field(hf, "head_dim", default=None), field(hf, "num_key_value_heads", default=h)
    # Defaults stay None, as in the presets.
    return dict(vocab_size=field(hf, "vocab_size"), d_model=d, n_layers=field(hf, "num_hidden_layers"),
                n_heads=h, n_kv_heads=None if n_kv == h else n_kv,
                head_dim=None if head_dim in (None, d // h) else head_dim, d_ff=field(hf, "intermediate_size"),
                norm="rmsnorm", norm_eps=float(field(hf, "rms_norm_eps", default=1e-6)),
                tie_embeddings=bool(field(hf, "tie_word_embeddings", default=False)), **_gated_act(hf))


def _llama_like_to(cfg: ModelConfig) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
                intermediate_size=cfg.d_ff, rms_norm_eps=cfg.norm_eps, hidden_act=_hf_act(cfg),
                tie_word_embeddings=cfg.tie_embeddings)


def _norm(hf: str, ours: str, cfg: ModelConfig) -> list[TensorMap]:
    maps = [TensorMap(f"{hf}.weight", (f"{ours}/scale",))]
    if cfg.norm == "layernorm":
        maps.append(TensorMap(f"{hf}.bias", (f"{ours}/bias",)))
    return maps


def _linear(hf: str, ours: tuple[str, ...], bias: bool, kind="linear", n_in=1, per_head=False):
    """Weight (+ bias) maps of a projection onto our `<name>/kernel` (+ `<name>/bias`) leaves."""
    maps = [TensorMap(f"{hf}.weight", tuple(f"{o}/kernel" for o in ours), kind, n_in, per_head)]
    if bias:
        maps.append(TensorMap(f"{hf}.bias", tuple(f"{o}/bias" for o in ours), "vector", per_head=per_head))
    return maps


QKV = ("layers/attn/q", "layers/attn/k", "layers/attn/v")
O, WI, WG, WO = "layers/attn/o", "layers/mlp/wi", "layers/mlp/wg", "layers/mlp/wo"


def _embed_and_head(embed: str, final_norm: str, cfg: ModelConfig, head="lm_head") -> list[TensorMap]:
    maps = [TensorMap(embed, ("embed/embedding",))] + _norm(final_norm, "final_norm", cfg)
    if not cfg.tie_embeddings:
        maps.append(TensorMap(f"{head}.weight", ("lm_head/kernel",), "linear"))
    return maps


def _llama_tensors(cfg: ModelConfig, qkv: str = "split", gate_up: bool = False) -> list[TensorMap]:
    """LLaMA naming; `qkv="pack"` is Baichuan's W_pack, `gate_up` GLM-4's fused gate/up projection."""
    p = "model.layers.{i}."
    maps = _embed_and_head("model.embed_tokens.weight", "model.norm", cfg)
    maps += _norm(p + "input_layernorm", "layers/attn_norm", cfg)
    maps += _norm(p + "post_attention_layernorm", "layers/mlp_norm", cfg)
    if qkv == "pack":
        maps += _linear(p + "self_attn.W_pack", QKV, cfg.qkv_bias)
    else:
        for name, ours in zip("qkv", QKV):
            maps += _linear(f"{p}self_attn.{name}_proj", (ours,), cfg.qkv_bias)
    maps += _linear(p + "self_attn.o_proj", (O,), cfg.out_bias, n_in=2)
    if gate_up:
        maps += _linear(p + "mlp.gate_up_proj", (WG, WI), cfg.mlp_bias)
    else:
        maps += _linear(p + "mlp.gate_proj", (WG,), cfg.mlp_bias) + _linear(p + "mlp.up_proj", (WI,), cfg.mlp_bias)
    maps += _linear(p + "mlp.down_proj", (WO,), cfg.mlp_bias)
    return maps


# --- LLaMA ---------------------------------------------------------------------------------------------

def _llama_from(hf: dict) -> dict:
    rope = _rope(hf)
    _require(rope["rope_fraction"] == 1.0, hf, "partial_rotary_factor is not applied by LlamaForCausalLM")
    bias = bool(field(hf, "attention_bias", default=False))
    return dict(_llama_like_from(hf), max_len=field(hf, "max_position_embeddings", default=2048), position="rope",
                **rope, qkv_bias=bias, out_bias=bias, mlp_bias=bool(field(hf, "mlp_bias", default=False)))


def _llama_to(cfg: ModelConfig) -> dict:
    return dict(_llama_like_to(cfg), model_type="llama", max_position_embeddings=cfg.max_len,
                attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, **_hf_rope(cfg))


# --- Baichuan (remote code): 7B is LLaMA with W_pack; 13B swaps RoPE for ALiBi ---------------------------

def _baichuan_from(hf: dict) -> dict:
    # The 7B configs carry max_position_embeddings (RoPE); the 13B ones only model_max_length (ALiBi).
    rope = "max_position_embeddings" in hf
    kw = dict(_llama_like_from(hf), qkv_bias=False, out_bias=False, mlp_bias=False,
              position="rope" if rope else "alibi",
              max_len=field(hf, "max_position_embeddings", "model_max_length", default=4096))
    return dict(kw, rope_theta=float(hf.get("rope_theta", 10000.0))) if rope else kw


def _baichuan_to(cfg: ModelConfig) -> dict:
    out = dict(_llama_like_to(cfg), model_type="baichuan", model_max_length=cfg.max_len)
    if cfg.position == "rope":
        out.update(max_position_embeddings=cfg.max_len, rope_theta=cfg.rope_theta)
    return out


# --- GLM-4 (transformers' GlmForCausalLM) --------------------------------------------------------------

def _glm_from(hf: dict) -> dict:
    return dict(_llama_like_from(hf), max_len=field(hf, "max_position_embeddings", default=2048), position="rope",
                **_rope(hf, fraction_default=0.5), rope_interleaved=True,
                qkv_bias=bool(field(hf, "attention_bias", default=True)), out_bias=False, mlp_bias=False)


def _glm_to(cfg: ModelConfig) -> dict:
    return dict(_llama_like_to(cfg), model_type="glm", max_position_embeddings=cfg.max_len,
                attention_bias=cfg.qkv_bias, **_hf_rope(cfg, partial=True))


# --- BLOOM ---------------------------------------------------------------------------------------------

def _bloom_from(hf: dict) -> dict:
    _require(not hf.get("apply_residual_connection_post_layernorm", False), hf,
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
    maps = _embed_and_head("transformer.word_embeddings.weight", "transformer.ln_f", cfg)
    maps += _norm("transformer.word_embeddings_layernorm", "embed_norm", cfg)
    maps += _norm(p + "input_layernorm", "layers/attn_norm", cfg)
    maps += _norm(p + "post_attention_layernorm", "layers/mlp_norm", cfg)
    maps += _linear(p + "self_attention.query_key_value", QKV, True, per_head=True)
    maps += _linear(p + "self_attention.dense", (O,), True, n_in=2)
    maps += _linear(p + "mlp.dense_h_to_4h", (WI,), True) + _linear(p + "mlp.dense_4h_to_h", (WO,), True)
    return maps


# --- GPT-2 ---------------------------------------------------------------------------------------------

_GPT2_ACTS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}


def _gpt2_from(hf: dict) -> dict:
    act = field(hf, "activation_function", default="gelu_new")
    _require(act in _GPT2_ACTS, hf, f"activation_function={act!r} (supported: {sorted(_GPT2_ACTS)})")
    _require(hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx", False), hf,
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
    maps = _embed_and_head("transformer.wte.weight", "transformer.ln_f", cfg)
    maps.append(TensorMap("transformer.wpe.weight", ("pos_embed",)))
    maps += _norm(p + "ln_1", "layers/attn_norm", cfg) + _norm(p + "ln_2", "layers/mlp_norm", cfg)
    maps += _linear(p + "attn.c_attn", QKV, True, kind="conv1d")
    maps += _linear(p + "attn.c_proj", (O,), True, kind="conv1d", n_in=2)
    maps += _linear(p + "mlp.c_fc", (WI,), True, kind="conv1d") + _linear(p + "mlp.c_proj", (WO,), True,
                                                                           kind="conv1d")
    return maps


# --- ChatGLM-6B (remote code): DeepNorm, GELU MLP, 2D RoPE, prefix-LM ------------------------------------
# Its config.json does not set tie_word_embeddings, so transformers' default (tied) applies.

def _chatglm_from(hf: dict) -> dict:
    _require(hf.get("position_encoding_2d", True), hf, "position_encoding_2d=False")
    _require(not hf.get("pre_seq_len"), hf, "P-tuning prefix encoder (pre_seq_len)")
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
    maps = _embed_and_head("transformer.word_embeddings.weight", "transformer.final_layernorm", cfg)
    maps += _norm(p + "input_layernorm", "layers/attn_norm", cfg)
    maps += _norm(p + "post_attention_layernorm", "layers/mlp_norm", cfg)
    maps += _linear(p + "attention.query_key_value", QKV, True, per_head=True)
    maps += _linear(p + "attention.dense", (O,), True, n_in=2)
    maps += _linear(p + "mlp.dense_h_to_4h", (WI,), True) + _linear(p + "mlp.dense_4h_to_h", (WO,), True)
    return maps


def _baichuan_tensors(cfg):
    return _llama_tensors(cfg, qkv="pack")


def _glm_tensors(cfg):
    return _llama_tensors(cfg, gate_up=True)


ARCHS = {a.name: a for a in [
    Arch("LlamaForCausalLM", _llama_from, _llama_to, _llama_tensors, "model."),
    Arch("BaichuanForCausalLM", _baichuan_from, _baichuan_to, _baichuan_tensors, "model."),
    Arch("BaiChuanForCausalLM", _baichuan_from, _baichuan_to, _baichuan_tensors, "model."),
    Arch("GlmForCausalLM", _glm_from, _glm_to, _glm_tensors, "model."),
    Arch("BloomForCausalLM", _bloom_from, _bloom_to, _bloom_tensors, "transformer."),
    Arch("GPT2LMHeadModel", _gpt2_from, _gpt2_to, _gpt2_tensors, "transformer."),
    Arch("ChatGLMForConditionalGeneration", _chatglm_from, _chatglm_to, _chatglm_tensors, "transformer."),
    Arch("ChatGLMModel", _chatglm_from, _chatglm_to, _chatglm_tensors, "transformer."),
]}


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

"""What every Hugging Face architecture mapping shares: `TensorMap`, `Arch`, config.json readers and helpers.

Each `Arch` says how an HF config maps onto `ModelConfig` fields (and back), and which HF tensor holds
which of our parameter leaves. A `TensorMap` covers fused tensors too (one HF tensor, several leaves):
LLaMA keeps q/k/v apart, Baichuan packs them in `W_pack`, GPT-2 in `c_attn` (Conv1D, `[in, out]`),
BLOOM and ChatGLM-6B interleave them per head in `query_key_value`, GLM-4 fuses gate and up projections.

An importer reads config.json through an `HFConfig`, which records every key read; `check_consumed` then
refuses any key no importer looked at unless it is known not to change the math (`HARMLESS`), so a
config field an architecture does not implement (a Mistral window under a Llama name) is an error naming it.
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
    # The family's `*ForSequenceClassification` (a reward model: same trunk tensors, `score.weight` [1, d] and no
    # bias instead of the LM head); None where transformers has no such class.
    seq_cls: Optional[str] = None

    def tensor_maps(self, cfg: ModelConfig, head: str = "lm") -> list[TensorMap]:
        """The tensor map of `Transformer(cfg, head)`: head "scalar" swaps the LM head for `score.weight` (the
        score bias, which the HF layer lacks, is not mapped: `lm.hf` checks it is zero)."""
        maps = self.tensors(cfg)
        if head == "lm":
            return maps
        return [m for m in maps if m.ours != ("lm_head/kernel",)] + [TensorMap("score.weight", ("score/kernel",),
                                                                              "linear")]


_REQUIRED = object()

# config.json keys that never change what the model computes: bookkeeping, token ids, dropout (off at
# inference), initialisation, generation defaults. Any other key must be read by the architecture's importer.
HARMLESS = frozenset("""
_name_or_path architectures model_type transformers_version dtype torch_dtype bos_token_id eos_token_id
pad_token_id sep_token_id decoder_start_token_id id2label label2id num_labels problem_type return_dict
output_attentions output_hidden_states use_cache is_encoder_decoder is_decoder chunk_size_feed_forward
initializer_range init_std initializer_factor tokenizer_class auto_map attention_dropout hidden_dropout
embd_pdrop resid_pdrop attn_pdrop dropout classifier_dropout activation_dropout layerdrop pretraining_tp
_attn_implementation_autoset attn_implementation finetuning_task prefix task_specific_params torchscript
tf_legacy_loss pruned_heads use_return_dict tie_encoder_decoder cross_attention_hidden_size
max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature top_k
top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size
bad_words_ids num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
begin_suppress_tokens keys_to_ignore_at_inference use_flash_attn use_flash_attention_2 model_max_length
mask_token_id gmask_token_id unk_token_id slow_but_exact reorder_and_upcast_attn
summary_activation summary_first_dropout summary_proj_to_labels summary_type summary_use_proj
""".split())


class HFConfig(dict):
    """config.json as a dict that records the keys an importer reads (`get`, `[]`, `in`)."""

    def __init__(self, d: dict):
        super().__init__(d)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def check_consumed(hf: HFConfig, arch_name: str) -> None:
    """Refuse config.json keys that `arch_name`'s importer did not read and that may change the math."""
    unread = sorted(k for k in dict.keys(hf) if k not in hf.read and k not in HARMLESS)
    if unread:
        shown = ", ".join(f"{k}={dict.__getitem__(hf, k)!r}" for k in unread)
        raise ValueError(f"config.json field(s) not implemented by the {arch_name} importer: {shown}. They may "
                         "change what the model computes, so the checkpoint is not loaded")


def field(hf: dict, *keys, default=_REQUIRED):
    """The first of `keys` present in an HF config; a missing required field is an error naming it."""
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    if default is _REQUIRED:
        raise ValueError(f"config.json has none of {list(keys)} (architecture {hf.get('architectures')})")
    return default


def or_default(hf: dict, key: str, default):
    """`hf[key]`, which may be an explicit null, or `default` (the config class's) when the key is absent; unlike
    `field`, a null stays null (e.g. Mistral's `sliding_window: null` means no window)."""
    return hf[key] if key in hf else default


def require(ok: bool, hf: dict, msg: str):
    if not ok:
        raise ValueError(f"unsupported {hf.get('architectures')} config: {msg}")


# Gated-MLP activations: HF name -> (our mlp kind, tanh-approximate GELU).
_GATED = {"silu": ("swiglu", True), "swish": ("swiglu", True), "gelu": ("geglu", False),
          "gelu_new": ("geglu", True), "gelu_pytorch_tanh": ("geglu", True)}


def gated_act(hf: dict, key: str = "hidden_act", default: str = "silu") -> dict:
    """mlp / gelu_approximate of the gated-MLP activation named by config key `key` (Gemma: hidden_activation)."""
    act = field(hf, key, default=default)
    require(act in _GATED, hf, f"{key}={act!r} (supported: {sorted(_GATED)})")
    mlp, approx = _GATED[act]
    return dict(mlp=mlp, gelu_approximate=approx)


def hf_act(cfg: ModelConfig) -> str:
    if cfg.mlp == "swiglu":
        return "silu"
    return "gelu_pytorch_tanh" if cfg.gelu_approximate else "gelu"


ROPE_KINDS = ("default", "linear", "llama3", "yarn")
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
              "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "truncate",
              "mscale", "mscale_all_dim"}


def rope(hf: dict, fraction_default: float = 1.0) -> dict:
    """RoPE fields (theta, fraction, scaling) from `rope_parameters` (transformers 5) or `rope_scaling` (older
    configs, with `rope_theta` at the top level); a scaling kind or key that is not implemented is an error."""
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    require(kind in ROPE_KINDS, hf, f"rope_type={kind!r} (implemented: {', '.join(ROPE_KINDS)})")
    unknown = sorted(set(rp) - _ROPE_KEYS)
    require(not unknown, hf, f"rope parameter(s) {unknown} in {rp}")
    out = dict(rope_theta=float(rp.get("rope_theta", hf.get("rope_theta", 10000.0))),
               rope_fraction=float(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor",
                                                                              fraction_default))))
    if kind == "default":
        return out
    for key in {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                "yarn": ("factor",)}[kind]:
        require(rp.get(key) is not None, hf, f"rope_type={kind!r} without {key!r}")
    out.update(rope_scaling=kind, rope_factor=float(rp["factor"]))
    if kind == "linear":
        return out
    original = rp.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    require(original is not None, hf, f"rope_type={kind!r} without original_max_position_embeddings")
    out["rope_original_max_len"] = int(original)
    if kind == "llama3":
        return dict(out, rope_low_freq_factor=float(rp["low_freq_factor"]),
                    rope_high_freq_factor=float(rp["high_freq_factor"]))
    attention = rp.get("attention_factor")
    if attention is None and rp.get("mscale") and rp.get("mscale_all_dim"):
        def mscale(scale, m):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        attention = mscale(out["rope_factor"], rp["mscale"]) / mscale(out["rope_factor"], rp["mscale_all_dim"])
    return dict(out, rope_beta_fast=float(rp.get("beta_fast") or 32.0), rope_beta_slow=float(rp.get("beta_slow") or 1.0),
                rope_attention_factor=None if attention is None else float(attention),
                rope_truncate=bool(rp.get("truncate", True)))


def hf_rope(cfg: ModelConfig, partial: bool = False) -> dict:
    """`rope_parameters` (and the top-level `rope_theta` older readers look for) of `cfg`."""
    params = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    if partial or cfg.rope_fraction != 1.0:
        params["partial_rotary_factor"] = cfg.rope_fraction
    if cfg.rope_scaling != "none":
        params["factor"] = cfg.rope_factor
    if cfg.rope_scaling in ("llama3", "yarn"):
        params["original_max_position_embeddings"] = cfg.rope_original_max_len
    if cfg.rope_scaling == "llama3":
        params.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    if cfg.rope_scaling == "yarn":
        params.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate)
        if cfg.rope_attention_factor is not None:
            params["attention_factor"] = cfg.rope_attention_factor
    return {"rope_parameters": params, "rope_theta": cfg.rope_theta}


def window_pattern(layer_types, n_layers: int, hf: dict) -> str:
    """HF's per-layer `layer_types` ("sliding_attention" / "full_attention") as our shortest repeating
    `window_pattern` ("L" local, "G" global)."""
    letters = {"sliding_attention": "L", "full_attention": "G"}
    require(len(layer_types) == n_layers and set(layer_types) <= set(letters), hf,
            f"layer_types={list(layer_types)} (want {n_layers} of {sorted(letters)})")
    full = "".join(letters[t] for t in layer_types)
    for n in range(1, n_layers + 1):
        if n_layers % n == 0 and full[:n] * (n_layers // n) == full:
            return full[:n]
    return full


def layer_types(cfg: ModelConfig) -> list[str]:
    """`cfg`'s per-layer attention kinds in HF's `layer_types` spelling."""
    windows = cfg.layer_windows() or [None] * cfg.n_layers
    return ["sliding_attention" if w == cfg.sliding_window and w is not None else "full_attention" for w in windows]


def llama_like_from(hf: dict, *, kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                    eps: float = 1e-6) -> dict:
    """Fields shared by LLaMA-like configs. kv_heads, head_dim, eps: the config class's defaults for absent
    keys (None: n_heads, d_model // n_heads), e.g. Mistral's 8 K/V heads or Qwen3's head_dim 128."""
    d, h = field(hf, "hidden_size"), field(hf, "num_attention_heads")
    head_dim, n_kv = field(hf, "head_dim", default=head_dim), field(hf, "num_key_value_heads", default=kv_heads or h)
    # Defaults stay None, as in the presets.
    return dict(vocab_size=field(hf, "vocab_size"), d_model=d, n_layers=field(hf, "num_hidden_layers"),
                n_heads=h, n_kv_heads=None if n_kv == h else n_kv,
                head_dim=None if head_dim in (None, d // h) else head_dim, d_ff=field(hf, "intermediate_size"),
                norm="rmsnorm", norm_eps=float(field(hf, "rms_norm_eps", default=eps)),
                tie_embeddings=bool(field(hf, "tie_word_embeddings", default=False)), **gated_act(hf))


def llama_like_to(cfg: ModelConfig) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
                intermediate_size=cfg.d_ff, rms_norm_eps=cfg.norm_eps, hidden_act=hf_act(cfg),
                tie_word_embeddings=cfg.tie_embeddings)


def norm(hf: str, ours: str, cfg: ModelConfig) -> list[TensorMap]:
    maps = [TensorMap(f"{hf}.weight", (f"{ours}/scale",))]
    if cfg.norm == "layernorm":
        maps.append(TensorMap(f"{hf}.bias", (f"{ours}/bias",)))
    return maps


def linear(hf: str, ours: tuple[str, ...], bias: bool, kind="linear", n_in=1, per_head=False):
    """Weight (+ bias) maps of a projection onto our `<name>/kernel` (+ `<name>/bias`) leaves."""
    maps = [TensorMap(f"{hf}.weight", tuple(f"{o}/kernel" for o in ours), kind, n_in, per_head)]
    if bias:
        maps.append(TensorMap(f"{hf}.bias", tuple(f"{o}/bias" for o in ours), "vector", per_head=per_head))
    return maps


QKV = ("layers/attn/q", "layers/attn/k", "layers/attn/v")
O, WI, WG, WO = "layers/attn/o", "layers/mlp/wi", "layers/mlp/wg", "layers/mlp/wo"


def embed_and_head(embed: str, final_norm: str, cfg: ModelConfig, head="lm_head") -> list[TensorMap]:
    maps = [TensorMap(embed, ("embed/embedding",))] + norm(final_norm, "final_norm", cfg)
    if not cfg.tie_embeddings:
        maps.append(TensorMap(f"{head}.weight", ("lm_head/kernel",), "linear"))
    return maps


def llama_tensors(cfg: ModelConfig, qkv: str = "split", gate_up: bool = False) -> list[TensorMap]:
    """LLaMA naming. qkv: "split" (q_proj, k_proj, v_proj) or the name of one fused [q; k; v] tensor
    (Baichuan's "W_pack", Phi-3's "qkv_proj"); gate_up: fused [gate; up] projection (GLM-4, Phi-3). Qwen3's
    per-head q/k norms come with `cfg.qk_norm`."""
    p = "model.layers.{i}."
    maps = embed_and_head("model.embed_tokens.weight", "model.norm", cfg)
    maps += norm(p + "input_layernorm", "layers/attn_norm", cfg)
    maps += norm(p + "post_attention_layernorm", "layers/mlp_norm", cfg)
    if qkv == "split":
        for name, ours in zip("qkv", QKV):
            maps += linear(f"{p}self_attn.{name}_proj", (ours,), cfg.qkv_bias)
    else:
        maps += linear(f"{p}self_attn.{qkv}", QKV, cfg.qkv_bias)
    if cfg.qk_norm:
        maps += norm(p + "self_attn.q_norm", "layers/attn/q_norm", cfg) + norm(p + "self_attn.k_norm",
                                                                               "layers/attn/k_norm", cfg)
    maps += linear(p + "self_attn.o_proj", (O,), cfg.out_bias, n_in=2)
    if gate_up:
        maps += linear(p + "mlp.gate_up_proj", (WG, WI), cfg.mlp_bias)
    else:
        maps += linear(p + "mlp.gate_proj", (WG,), cfg.mlp_bias) + linear(p + "mlp.up_proj", (WI,), cfg.mlp_bias)
    maps += linear(p + "mlp.down_proj", (WO,), cfg.mlp_bias)
    return maps

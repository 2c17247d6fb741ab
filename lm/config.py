"""`ModelConfig`: a decoder described by its parts (norms, residual scheme, MLP, positions, mask), not by name."""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import jax.numpy as jnp


# Fields that change how a model runs or trains, not the function it computes: a run may resume or start from
# a checkpoint with other values of these (bf16 compute, remat, kernels, a longer cache for RoPE models).
# Window of a global layer in a model that also has local ones: wider than any sequence.
GLOBAL_WINDOW = 2 ** 30

# Projections that may carry LoRA adapters; the layers' ones (all but lm_head) may be stored quantised.
LORA_TARGETS = ("q", "k", "v", "o", "wi", "wg", "wo", "lm_head")
QUANT_TARGETS = LORA_TARGETS[:-1]

# The adaptation fields (lm.peft): off at their defaults.
ADAPTER_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "lora_rslora", "prompt_tokens",
                  "prefix_tokens", "quant", "quant_block", "quant_head")

RUNTIME_FIELDS = ("dtype", "param_dtype", "attention_impl", "remat", "scan_unroll", "init_std", "embed_grad_scale",
                  "max_len")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of one decoder Transformer. Families (LLaMA, BLOOM, GLM, ...) are presets of this.

    Attributes:
      vocab_size: number of token ids (embedding rows and logits).
      d_model: width of the residual stream.
      n_layers: number of Transformer blocks.
      n_heads: number of query heads.
      n_kv_heads: number of key/value heads (GQA: a divisor of n_heads; MQA: 1). None means n_heads.
      head_dim: width of one head. None means d_model // n_heads.
      d_ff: hidden width of the MLP (per branch for gated MLPs).
      max_len: longest sequence: size of learned position tables and the default KV-cache length.
      norm: "rmsnorm" (LLaMA, Baichuan) or "layernorm" (BLOOM, GLM, GPT).
      norm_eps: epsilon inside the norms.
      norm_scale_offset: the norms multiply by `offset + w` with `w` initialised to `1 - offset` (Gemma: 1.0,
        i.e. `(1 + w)` with `w` stored around zero).
      residual: "prenorm" (`x + f(LN(x))`), "deepnorm" (GLM: `LN(x) * alpha + f(LN(x))`, i.e. post-LN
        `LN(alpha * x + f(x))` with the LN applied at the start of the next sub-layer) or "parallel" (GPT-NeoX:
        `x + attn(LN1(x)) + mlp(LN2(x))`).
      post_norms: also normalise each sub-layer's output before it joins the residual (Gemma2 "sandwich").
      deepnorm_alpha: residual scale of DeepNorm. None means GLM's `sqrt(2 * n_layers)`.
      mlp: "swiglu" (LLaMA), "geglu" (GLM-130B, Gemma) or non-gated "gelu" (BLOOM, GPT, ChatGLM-6B, GPT-NeoX)
        or "relu" (OPT).
      gelu_approximate: use the tanh approximation of GELU (BLOOM, GPT-2, ChatGLM-6B) instead of the exact erf.
      position: "rope" (LLaMA, GLM-4), "rope2d" (ChatGLM-6B: half the rotary dims follow the position, half
        the position inside a generated span), "alibi" (BLOOM, Baichuan-13B) or "learned" (GPT).
      rope_theta: RoPE base frequency.
      local_rope_theta: RoPE base of the local (sliding-window) layers when it differs from rope_theta (Gemma3:
        10000 local, 1e6 global); None: rope_theta everywhere.
      rope_scaling: "none", "linear" (frequencies / factor), "llama3" (Llama-3.1: low frequencies / factor,
        high ones kept, a smooth ramp between) or "yarn" (NTK-by-parts ramp plus a cos/sin attention factor).
      rope_factor: the context-extension factor of the scaling.
      rope_original_max_len: context length the model was pretrained with (llama3, yarn).
      rope_low_freq_factor, rope_high_freq_factor: llama3's wavelength bounds (original length / factor).
      rope_beta_fast, rope_beta_slow: yarn's ramp bounds, in rotations over the original length.
      rope_attention_factor: yarn's cos/sin scale; None means `0.1 * ln(factor) + 1`.
      rope_truncate: yarn rounds the ramp bounds to whole dims (floor/ceil).
      rope_fraction: fraction of each head's dims that are rotated (GLM-4: 0.5).
      rope_interleaved: rotate adjacent pairs (GPT-J/GLM-4 style) instead of the two halves (LLaMA/HF style).
      mask: "causal", or "prefix" (GLM: bidirectional over the first `prefix_len[b]` tokens, causal after).
      sliding_window: a local layer's query i sees keys j with `i - W < j <= i` (Mistral, Gemma2); None: none.
      window_pattern: which layers are local, as "L" (local) / "G" (global) letters repeated over the layers:
        "L" every layer (Mistral), "LG" alternating from a local first layer (Gemma2), "GGLL" (Qwen2's
        `max_window_layers=2` of 4 layers).
      attn_softcap: attention logits become `cap * tanh(logits / cap)` before the mask (Gemma2); None: off.
      final_softcap: the same on the output logits.
      query_pre_attn_scalar: attention logits are scaled by `query_pre_attn_scalar ** -0.5` (Gemma) instead of
        `head_dim ** -0.5`; None: head_dim.
      qk_norm: a norm (`norm`, over head_dim, one scale per dim shared by all heads) on every query and key
        head before RoPE (Qwen3).
      embed_norm: LayerNorm right after the token embedding (BLOOM).
      embed_scale: multiply the token embeddings by `sqrt(d_model)` (Gemma).
      pos_offset: learned positions read row `position + pos_offset` of a `[max_len + pos_offset, d_model]`
        table (OPT: 2).
      embed_grad_scale: GLM-130B's embedding-gradient shrink: the forward is unchanged and the gradient into
        the embedding is multiplied by this factor (1.0 disables it; GLM-130B uses 0.1).
      qkv_bias: biases on the query/key/value projections.
      out_bias: bias on the attention output projection.
      mlp_bias: biases on the MLP projections.
      tie_embeddings: output logits use the transposed token embedding (BLOOM, GPT) instead of a separate head.
      num_labels: outputs of the `score` head (`Transformer(cfg, head="scalar")`): 1 for a reward model or critic
        (one value per position), N for an N-way classifier (lm.classify); HF `*ForSequenceClassification`'s
        `num_labels`. The language-model head ignores it.
      init_std: standard deviation of the normal initialiser of every weight matrix.
      dtype: compute dtype ("float32" or "bfloat16"); norms, softmax and losses always run in float32.
      param_dtype: dtype the parameters are stored in.
      attention_impl: "xla" (pure-JAX reference) or "pallas" (flash/decode kernels); results are the same.
      remat: activation checkpointing of each block: "none", "full" or "dots" (save matmul outputs only).
      scan_unroll: layers per iteration of the scanned block stack; 0 unrolls the whole stack (no loop), so
        XLA fuses across layers: small models on CPU run faster (a 4-layer PPO iteration 1.3x), while compile
        time grows with depth. The parameters are stacked `[n_layers, ...]` either way.

    Parameter-efficient adaptation (lm.peft; all off by default). The adapters are extra parameters beside a
    base that a stage keeps frozen:
      lora_rank: rank r of LoRA adapters (Hu et al. 2021) on the `lora_targets` projections; 0: none. Each
        target computes `x W + s * (x A) B` with A `[in, r]` (uniform, as PEFT) and B `[r, out]` (zeros).
      lora_alpha: s = lora_alpha / r, or lora_alpha / sqrt(r) with lora_rslora (rank-stabilised, Kalajdzievski
        2023).
      lora_targets: comma-separated projections: q, k, v, o (attention), wi, wg, wo (MLP), lm_head.
      lora_dropout: dropout on a target's input to its adapter while training (needs a "dropout" rng).
      prompt_tokens: learned soft-prompt embeddings put before every sequence (prompt tuning, Lester et al.
        2021); 0: none.
      prefix_tokens: learned per-layer keys/values every token attends to (prefix tuning / P-tuning v2, the
        fine-tuning method of ChatGLM-6B); 0: none. Prompt or prefix tokens sit at positions 0..n-1 and
        shift the real tokens by n, also in the KV cache (whose length grows by n).
      quant: "none", or "int8" / "int4" / "nf4": the layers' projection kernels are stored block-wise
        quantised (lm.quant) and dequantised inside each matmul (QLoRA's frozen base; `lm.quantize` for
        weight-only quantised inference); "w8a8": int8 kernels with a scale per output column, multiplied by
        int8-rounded activations in integers (inference only, `lm.quantize`).
      quant_block: entries per quantisation block along a kernel's last input axis (QLoRA: 64).
      quant_head: the output head (`lm_head`, untied) is stored `quant` too (`lm.quantize(..., head=True)`).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    d_ff: int
    max_len: int = 2048
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-6
    norm_scale_offset: float = 0.0
    residual: Literal["prenorm", "deepnorm", "parallel"] = "prenorm"
    deepnorm_alpha: Optional[float] = None
    post_norms: bool = False
    mlp: Literal["swiglu", "geglu", "gelu", "relu"] = "swiglu"
    gelu_approximate: bool = True
    position: Literal["rope", "rope2d", "alibi", "learned"] = "rope"
    rope_theta: float = 10000.0
    local_rope_theta: Optional[float] = None
    rope_fraction: float = 1.0
    rope_interleaved: bool = False
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
    rope_factor: float = 1.0
    rope_original_max_len: Optional[int] = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_attention_factor: Optional[float] = None
    rope_truncate: bool = True
    mask: Literal["causal", "prefix"] = "causal"
    sliding_window: Optional[int] = None
    window_pattern: str = "L"
    attn_softcap: Optional[float] = None
    final_softcap: Optional[float] = None
    query_pre_attn_scalar: Optional[float] = None
    qk_norm: bool = False
    embed_norm: bool = False
    embed_scale: bool = False
    pos_offset: int = 0
    embed_grad_scale: float = 1.0
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    num_labels: int = 1
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: Literal["xla", "pallas"] = "xla"
    remat: Literal["none", "full", "dots"] = "none"
    scan_unroll: int = 1
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "q,k,v,o"
    lora_dropout: float = 0.0
    lora_rslora: bool = False
    prompt_tokens: int = 0
    prefix_tokens: int = 0
    quant: Literal["none", "int8", "int4", "nf4", "w8a8"] = "none"
    quant_block: int = 64
    quant_head: bool = False

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

        choices = {
            "norm": ("rmsnorm", "layernorm"),
            "residual": ("prenorm", "deepnorm", "parallel"),
            "mlp": ("swiglu", "geglu", "gelu", "relu"),
            "rope_scaling": ("none", "linear", "llama3", "yarn"),
            "position": ("rope", "rope2d", "alibi", "learned"),
            "mask": ("causal", "prefix"),
            "attention_impl": ("xla", "pallas"),
            "remat": ("none", "full", "dots"),
            "dtype": ("float32", "bfloat16", "float16"),
            "param_dtype": ("float32", "bfloat16", "float16"),
            "quant": ("none", "int8", "int4", "nf4", "w8a8"),
        }
        for field, allowed in choices.items():
            check(getattr(self, field) in allowed,
                  f"{field}={getattr(self, field)!r} is not one of {allowed}")
        check(self.scan_unroll >= 0, f"scan_unroll must be >= 0 (0 = unroll every layer), got {self.scan_unroll}")
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len", "num_labels"):
            check(getattr(self, field) > 0, f"{field} must be positive, got {getattr(self, field)}")
        check(self.n_heads % self.kv_heads == 0,
              f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
        check(self.head_dim is not None or self.d_model % self.n_heads == 0,
              f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        check(0.0 < self.rope_fraction <= 1.0, f"rope_fraction={self.rope_fraction} not in (0, 1]")
        if self.position in ("rope", "rope2d"):
            check(self.rotary_dim % (4 if self.position == "rope2d" else 2) == 0,
                  f"rotary dims {self.rotary_dim} must split into pairs (and halves for rope2d)")
        if self.rope_scaling != "none":
            check(self.position == "rope", f"rope_scaling={self.rope_scaling!r} needs position='rope'")
            check(self.rope_factor >= 1.0, f"rope_factor={self.rope_factor} must be >= 1")
            check(self.rope_scaling == "linear" or (self.rope_original_max_len or 0) > 0,
                  f"rope_scaling={self.rope_scaling!r} needs rope_original_max_len")
        if self.rope_scaling == "llama3":
            check(self.rope_high_freq_factor > self.rope_low_freq_factor > 0,
                  "rope_high_freq_factor must exceed rope_low_freq_factor > 0")
        if self.sliding_window is not None:
            check(self.sliding_window > 0, f"sliding_window must be positive, got {self.sliding_window}")
            check(self.mask == "causal", "sliding_window needs mask='causal' (no windowed prefix-LM)")
        check(bool(self.window_pattern) and set(self.window_pattern) <= {"L", "G"},
              f"window_pattern={self.window_pattern!r} must be a non-empty string of 'L' (local) / 'G' (global)")
        for field in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            value = getattr(self, field)
            check(value is None or value > 0, f"{field} must be positive or None, got {value}")
        if self.local_rope_theta is not None:
            check(self.local_rope_theta > 0, f"local_rope_theta must be positive, got {self.local_rope_theta}")
            check(self.position == "rope" and self.sliding_window is not None,
                  "local_rope_theta needs position='rope' and sliding_window (it is the local layers' base)")
        check(self.pos_offset >= 0, f"pos_offset must be >= 0, got {self.pos_offset}")
        check(self.pos_offset == 0 or self.position == "learned", "pos_offset needs position='learned'")
        check(self.residual != "parallel" or not self.post_norms, "residual='parallel' has no post_norms")
        unknown = set(self.lora_target_set) - set(LORA_TARGETS)
        check(not unknown, f"lora_targets={self.lora_targets!r} has unknown projection(s) {sorted(unknown)}; "
                           f"known: {','.join(LORA_TARGETS)}")
        check(self.lora_rank == 0 or self.lora_target_set, "lora_rank > 0 needs at least one lora_targets entry")
        for field in ("lora_rank", "prompt_tokens", "prefix_tokens"):
            check(getattr(self, field) >= 0, f"{field} must be >= 0, got {getattr(self, field)}")
        check(not (self.prompt_tokens and self.prefix_tokens), "prompt_tokens and prefix_tokens are exclusive")
        check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout={self.lora_dropout} not in [0, 1)")
        check(self.quant_block > 1, f"quant_block must be > 1, got {self.quant_block}")
        check(not self.quant_head or (self.quant != "none" and not self.tie_embeddings),
              "quant_head needs a quant format and an untied output head (tie_embeddings=False)")

    @property
    def lora_target_set(self) -> tuple[str, ...]:
        """The projections that get LoRA adapters (empty when lora_rank is 0)."""
        if not self.lora_rank:
            return ()
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def lora_scale(self) -> float:
        """Factor of the adapters' output: lora_alpha / r (rsLoRA: / sqrt(r))."""
        return self.lora_alpha / (math.sqrt(self.lora_rank) if self.lora_rslora else self.lora_rank)

    @property
    def has_adapters(self) -> bool:
        """True when the model has adapters (LoRA, soft prompt or prefix) beside its weights."""
        return bool(self.lora_rank or self.virtual_tokens)

    @property
    def virtual_tokens(self) -> int:
        """Positions taken by prompt- or prefix-tuning tokens in front of every sequence."""
        return self.prompt_tokens + self.prefix_tokens

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads."""
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        """Width of one attention head."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """Number of dims of each head that RoPE rotates."""
        return int(self.dim_per_head * self.rope_fraction)

    def layer_windows(self) -> Optional[tuple[int, ...]]:
        """Each layer's window (`sliding_window` for local layers, `GLOBAL_WINDOW` for global ones), or None
        when no layer has one."""
        if self.sliding_window is None:
            return None
        pattern = self.window_pattern
        return tuple(self.sliding_window if pattern[i % len(pattern)] == "L" else GLOBAL_WINDOW
                     for i in range(self.n_layers))

    @property
    def rope_scaling_spec(self):
        """The `lm.kernels.reference.RopeScaling` of this config, or None without scaling."""
        if self.rope_scaling == "none":
            return None
        from lm.kernels.reference import RopeScaling
        return RopeScaling(self.rope_scaling, self.rope_factor, self.rope_original_max_len, self.rope_low_freq_factor,
                           self.rope_high_freq_factor, self.rope_beta_fast, self.rope_beta_slow,
                           self.rope_attention_factor, self.rope_truncate)

    @property
    def attn_scale(self) -> Optional[float]:
        """Scale of the attention logits; None means `head_dim ** -0.5`."""
        return None if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar ** -0.5

    @property
    def alpha(self) -> float:
        """DeepNorm residual scale (1.0 for pre-norm)."""
        if self.residual != "deepnorm":
            return 1.0
        return self.deepnorm_alpha if self.deepnorm_alpha is not None else math.sqrt(2 * self.n_layers)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_same_model(self, other: "ModelConfig", where: str) -> None:
        """Raise a ValueError naming every field, other than how the model runs (`RUNTIME_FIELDS`), in which
        `other` differs from this config: e.g. a RoPE checkpoint resumed with `position="alibi"` has the same
        shapes but computes another function."""
        diffs = [f"{f.name}: {getattr(self, f.name)!r} there, {getattr(other, f.name)!r} here"
                 for f in dataclasses.fields(self)
                 if f.name not in RUNTIME_FIELDS and getattr(self, f.name) != getattr(other, f.name)]
        if diffs:
            raise ValueError(f"{where} holds another model than this run's config describes:\n  " + "\n  ".join(diffs)
                             + "\nset those fields to the saved values (in a run's config: drop those model.overrides)")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a dict (e.g. a checkpoint's metadata); unknown keys are an error that names them."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {sorted(unknown)}")
        return cls(**d)

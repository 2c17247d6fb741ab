"""`ModelConfig`: a decoder described by its parts (norms, residual scheme, MLP, positions, mask), not by name."""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import jax.numpy as jnp


# Fields that change how a model runs or trains, not the function it computes: a run may resume or start from
# a checkpoint with other values of these (bf16 compute, remat, kernels, a longer cache for RoPE models).
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
      residual: "prenorm" (`x + f(LN(x))`) or "deepnorm" (GLM: `LN(x) * alpha + f(LN(x))`, i.e. post-LN
        `LN(alpha * x + f(x))` with the LN applied at the start of the next sub-layer).
      deepnorm_alpha: residual scale of DeepNorm. None means GLM's `sqrt(2 * n_layers)`.
      mlp: "swiglu" (LLaMA), "geglu" (GLM-130B) or "gelu" (BLOOM, GPT, ChatGLM-6B; non-gated).
      gelu_approximate: use the tanh approximation of GELU (BLOOM, GPT-2, ChatGLM-6B) instead of the exact erf.
      position: "rope" (LLaMA, GLM-4), "rope2d" (ChatGLM-6B: half the rotary dims follow the position, half
        the position inside a generated span), "alibi" (BLOOM, Baichuan-13B) or "learned" (GPT).
      rope_theta: RoPE base frequency.
      rope_fraction: fraction of each head's dims that are rotated (GLM-4: 0.5).
      rope_interleaved: rotate adjacent pairs (GPT-J/GLM-4 style) instead of the two halves (LLaMA/HF style).
      mask: "causal", or "prefix" (GLM: bidirectional over the first `prefix_len[b]` tokens, causal after).
      embed_norm: LayerNorm right after the token embedding (BLOOM).
      embed_grad_scale: GLM-130B's embedding-gradient shrink: the forward is unchanged and the gradient into
        the embedding is multiplied by this factor (1.0 disables it; GLM-130B uses 0.1).
      qkv_bias: biases on the query/key/value projections.
      out_bias: bias on the attention output projection.
      mlp_bias: biases on the MLP projections.
      tie_embeddings: output logits use the transposed token embedding (BLOOM, GPT) instead of a separate head.
      init_std: standard deviation of the normal initialiser of every weight matrix.
      dtype: compute dtype ("float32" or "bfloat16"); norms, softmax and losses always run in float32.
      param_dtype: dtype the parameters are stored in.
      attention_impl: "xla" (pure-JAX reference) or "pallas" (flash/decode kernels); results are the same.
      remat: activation checkpointing of each block: "none", "full" or "dots" (save matmul outputs only).
      scan_unroll: layers per iteration of the scanned block stack; 0 unrolls the whole stack (no loop), so
        XLA fuses across layers: small models on CPU run faster (a 4-layer PPO iteration 1.3x), while compile
        time grows with depth. The parameters are stacked `[n_layers, ...]` either way.
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
    residual: Literal["prenorm", "deepnorm"] = "prenorm"
    deepnorm_alpha: Optional[float] = None
    mlp: Literal["swiglu", "geglu", "gelu"] = "swiglu"
    gelu_approximate: bool = True
    position: Literal["rope", "rope2d", "alibi", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0
    rope_interleaved: bool = False
    mask: Literal["causal", "prefix"] = "causal"
    embed_norm: bool = False
    embed_grad_scale: float = 1.0
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: Literal["xla", "pallas"] = "xla"
    remat: Literal["none", "full", "dots"] = "none"
    scan_unroll: int = 1

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

        choices = {
            "norm": ("rmsnorm", "layernorm"),
            "residual": ("prenorm", "deepnorm"),
            "mlp": ("swiglu", "geglu", "gelu"),
            "position": ("rope", "rope2d", "alibi", "learned"),
            "mask": ("causal", "prefix"),
            "attention_impl": ("xla", "pallas"),
            "remat": ("none", "full", "dots"),
            "dtype": ("float32", "bfloat16", "float16"),
            "param_dtype": ("float32", "bfloat16", "float16"),
        }
        for field, allowed in choices.items():
            check(getattr(self, field) in allowed,
                  f"{field}={getattr(self, field)!r} is not one of {allowed}")
        check(self.scan_unroll >= 0, f"scan_unroll must be >= 0 (0 = unroll every layer), got {self.scan_unroll}")
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len"):
            check(getattr(self, field) > 0, f"{field} must be positive, got {getattr(self, field)}")
        check(self.n_heads % self.kv_heads == 0,
              f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
        check(self.head_dim is not None or self.d_model % self.n_heads == 0,
              f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        check(0.0 < self.rope_fraction <= 1.0, f"rope_fraction={self.rope_fraction} not in (0, 1]")
        if self.position in ("rope", "rope2d"):
            check(self.rotary_dim % (4 if self.position == "rope2d" else 2) == 0,
                  f"rotary dims {self.rotary_dim} must split into pairs (and halves for rope2d)")

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

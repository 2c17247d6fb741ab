"""One pure-functional Transformer for every family: `Transformer(cfg, head="lm" | "scalar" | "lm+scalar")`.

Parameters carry logical axis names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, plus
`layers` for the scanned block stack); activations are pinned with `nn.with_logical_constraint`, so one
rules table (lm.sharding) decides how everything is laid out on a mesh.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import kernels, quant, sharding
from lm.config import GLOBAL_WINDOW, QUANT_TARGETS, ModelConfig

# KV cache: {"k": [L, B, Hkv, S, D], "v": [L, B, Hkv, S, D]} with the layers stacked (`init_cache`), or with
# tuples of L arrays [B, Hkv, S, D] (`unstack_cache`, the decode layout on CPU: see lm.generation). Heads come
# before positions so single-token attention is a batched matmul over the cache as it lies, with no transpose.
Cache = dict
# Adapters (LoRA, soft prompts, prefixes) are few and trained on a frozen base: always stored in float32.
ADAPTER_DTYPE = jnp.float32


def _init(cfg: ModelConfig, names):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), names)


def _zeros(names):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class Dense(nn.Module):
    """`x` contracted over its last `n_in` dims with a kernel `[*in_dims, *features]` named by `names`.

    Unlike nn.DenseGeneral, the kernel is created in its real shape (not flattened first), so its logical
    names still match when a mesh and axis rules are active. The contraction runs as one 2D matmul over the
    flattened leading dims: XLA:CPU computes the backward of a `[B, T, E]` tensordot several times slower
    (a whole pretraining step is 1.6x slower), and other backends lower both forms alike.

    The module's name decides its adaptation (lm.config.LORA_TARGETS): with `cfg.quant` a layer projection's
    kernel is stored quantised (`kernel` codes + `kernel_scale`, lm.quant) and dequantised here; a LoRA
    target adds `lora_a [*in_dims, r]` and `lora_b [r, *features]`. `param_dtype` overrides the config's
    (a scalar head trained beside adapters is float32, as they are).
    """
    cfg: ModelConfig
    features: tuple
    names: tuple
    use_bias: bool
    n_in: int = 1
    param_dtype: Any = None

    def _quantised(self) -> bool:
        cfg = self.cfg
        return cfg.quant != "none" and (self.name in QUANT_TARGETS or (self.name == "lm_head" and cfg.quant_head))

    def _codes(self, shape):
        """The stored `(codes, scale)` of a quantised kernel of `shape`."""
        cfg = self.cfg
        axis = self.n_in - 1  # blocks run along the last contracting axis
        codes_shape, codes_dtype, scale_shape = quant.shapes(shape, cfg.quant, cfg.quant_block, axis,
                                                             f"{self.name} kernel {shape}", self.n_in)
        codes = self.param("kernel", _zeros(self.names), codes_shape, codes_dtype)
        scale = self.param("kernel_scale", nn.with_logical_partitioning(nn.initializers.ones_init(), self.names),
                           scale_shape, jnp.float32)
        return codes, scale

    def _kernel(self, shape):
        """The float kernel of `shape`: the parameter itself, or a block-wise quantised one dequantised."""
        cfg = self.cfg
        if not self._quantised():
            return self.param("kernel", _init(cfg, self.names), shape, self.param_dtype or cfg.params_dtype)
        return quant.dequantize(*self._codes(shape), cfg.quant, self.n_in - 1, cfg.compute_dtype)

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dt = cfg.compute_dtype
        shape = x.shape[x.ndim - self.n_in:] + self.features
        lead, k_in = x.shape[:x.ndim - self.n_in], int(np.prod(shape[:self.n_in]))
        x2 = x.astype(dt).reshape(-1, k_in)
        if cfg.quant == quant.W8A8 and self._quantised():  # integer matmul: no float kernel at all
            codes, scale = self._codes(shape)
            y = quant.matmul_w8a8(x2, codes.reshape(k_in, -1), scale.reshape(-1)).astype(dt)
        else:
            y = jnp.dot(x2, self._kernel(shape).astype(dt).reshape(k_in, -1))
        if self.name in cfg.lora_target_set:
            r = cfg.lora_rank
            a = self.param("lora_a", nn.with_logical_partitioning(_LORA_A_INIT, self.names[:self.n_in] + ("lora",)),
                           shape[:self.n_in] + (r,), ADAPTER_DTYPE)
            b = self.param("lora_b", _zeros(("lora",) + self.names[self.n_in:]), (r,) + self.features,
                           ADAPTER_DTYPE)
            if cfg.lora_dropout and self.has_rng("dropout"):
                x2 = nn.Dropout(cfg.lora_dropout, deterministic=False)(x2)
            h = jnp.dot(x2, a.astype(dt).reshape(k_in, r))
            y = y + jnp.dot(h, b.astype(dt).reshape(r, -1)) * jnp.asarray(cfg.lora_scale, dt)
        y = y.reshape(lead + self.features)
        if self.use_bias:
            bias = self.param("bias", _zeros(self.names[self.n_in:]), self.features,
                              self.param_dtype or cfg.params_dtype)
            y = y + bias.astype(dt)
        return y


# PEFT's LoRA A init: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
# (Default axes: fan_in is the product of every axis but the last, the rank.)
_LORA_A_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _dense(cfg, features, names, bias, name, axis=-1, param_dtype=None):
    """A `Dense` whose kernel (and bias) carry logical axis names."""
    n_in = 1 if isinstance(axis, int) else len(axis)
    features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
    return Dense(cfg, features, tuple(names), bias, n_in, param_dtype, name=name)


class OffsetNorm(nn.Module):
    """RMSNorm / LayerNorm in float32 whose learned scale `w` is applied as `offset + w` (Gemma: `1 + w`)."""
    cfg: ModelConfig
    names: tuple

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        offset = cfg.norm_scale_offset
        x = x.astype(jnp.float32)
        if cfg.norm == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
        init = nn.with_logical_partitioning(nn.initializers.constant(1.0 - offset), self.names)
        scale = self.param("scale", init, x.shape[-1:], cfg.params_dtype)
        x = x * (offset + scale.astype(jnp.float32))
        if cfg.norm == "layernorm":
            x = x + self.param("bias", _zeros(self.names), x.shape[-1:], cfg.params_dtype).astype(jnp.float32)
        return x


def make_norm(cfg: ModelConfig, name: str, names: tuple = ("embed",)):
    """RMSNorm or LayerNorm computed in float32 over the last axis, with a scale (and bias) named `names`."""
    if cfg.norm_scale_offset:
        return OffsetNorm(cfg, names, name=name)
    ones = nn.with_logical_partitioning(nn.initializers.ones_init(), names)
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=cfg.params_dtype,
                          scale_init=ones, name=name)
    return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=cfg.params_dtype,
                        scale_init=ones, bias_init=_zeros(names), name=name)


def default_positions(cfg: ModelConfig, batch: int, length: int, offset=None, prefix_len=None):
    """Positions of `length` tokens starting at `offset` ([B] or None): `[B, T]`, or `[B, T, 2]` for rope2d.

    For GLM's 2D scheme (ChatGLM-6B), tokens inside the prefix get (i, 0); tokens after it, the generated
    span, keep the position of the last prefix token and count 1, 2, ... in the second component.
    """
    idx = jnp.arange(length)[None, :] + (0 if offset is None else offset[:, None])
    idx = jnp.broadcast_to(idx, (batch, length)).astype(jnp.int32)
    if cfg.position != "rope2d":
        return idx
    if prefix_len is None:
        return jnp.stack([idx, jnp.zeros_like(idx)], axis=-1)
    p = prefix_len[:, None]
    inside = idx < p
    return jnp.stack([jnp.where(inside, idx, p - 1), jnp.where(inside, 0, idx - p + 1)], axis=-1)


class Attention(nn.Module):
    """Multi-head attention with GQA, RoPE/ALiBi, prefix-LM, packed-sequence and sliding-window masks, logit
    soft-capping, q/k norms and a KV cache. `window` is this layer's sliding window (int32 scalar) or None."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, ctx, layer_cache: Optional[Cache], window=None):
        cfg = self.cfg
        hq, hkv, d = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        q = _dense(cfg, (hq, d), ("embed", "heads", "head_dim"), cfg.qkv_bias, "q")(x)
        k = _dense(cfg, (hkv, d), ("embed", "kv_heads", "head_dim"), cfg.qkv_bias, "k")(x)
        v = _dense(cfg, (hkv, d), ("embed", "kv_heads", "head_dim"), cfg.qkv_bias, "v")(x)
        if cfg.qk_norm:
            q = make_norm(cfg, "q_norm", ("head_dim",))(q).astype(cfg.compute_dtype)
            k = make_norm(cfg, "k_norm", ("head_dim",))(k).astype(cfg.compute_dtype)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        if cfg.position in ("rope", "rope2d"):
            rope = dict(impl=cfg.attention_impl, theta=cfg.rope_theta, rotary_dim=cfg.rotary_dim,
                        interleaved=cfg.rope_interleaved)
            if cfg.rope_scaling != "none":
                rope["scaling"] = cfg.rope_scaling_spec

            def rotate(t):
                out = kernels.rope(t, ctx["positions"], **rope)
                if cfg.local_rope_theta is None or window is None:
                    return out
                # Gemma3: local layers have their own base. The layer kind is a scanned (traced) value, so both
                # rotations are computed and one is kept.
                local = kernels.rope(t, ctx["positions"], **dict(rope, theta=cfg.local_rope_theta))
                return jnp.where(window < GLOBAL_WINDOW, local, out)

            q, k = rotate(q), rotate(k)
        if cfg.prefix_tokens and ctx["decode_index"] is None:
            # Prefix tuning: the first n positions (the virtual tokens) hold learned keys and values.
            n, b = cfg.prefix_tokens, x.shape[0]
            names = ("length", "kv_heads", "head_dim")
            k, v = (jnp.concatenate([jnp.broadcast_to(self.param(name, _init(cfg, names), (n, hkv, d),
                                                                 ADAPTER_DTYPE).astype(t.dtype), (b, n, hkv, d)),
                                     t[:, n:]], axis=1)
                    for name, t in (("prefix_k", k), ("prefix_v", v)))
        slopes = kernels.alibi_slopes(hq) if cfg.position == "alibi" else None
        causal_kw = dict(impl=cfg.attention_impl, alibi_slopes=slopes)
        # Only the fields a config sets are passed, so kernels see the arguments they always saw otherwise.
        extras = dict(sm_scale=cfg.attn_scale, softcap=cfg.attn_softcap, window=window)
        causal_kw.update({name: value for name, value in extras.items() if value is not None})

        new_cache = None
        if layer_cache is not None and ctx["decode_index"] is not None:
            # Decode: one token per row, written in place at [b, :, decode_index[b]] of this layer's cache. With
            # `layer` the cache is the whole stack [L, B, Hkv, S, D], carried through the layers (`_CachedBlock`)
            # so that only this layer's slice is written and read; without it, this layer's own array.
            idx, layer = ctx["decode_index"], layer_cache.get("layer")
            at = (jnp.arange(idx.shape[0]), slice(None), idx)
            at = at if layer is None else (layer,) + at
            new_cache = {n: layer_cache[n].at[at].set(t[:, 0].astype(layer_cache[n].dtype))
                         for n, t in (("k", k), ("v", v))}
            kv = [c if layer is None else c[layer] for c in (new_cache["k"], new_cache["v"])]
            out = kernels.decode_attention(q[:, 0], kv[0].astype(q.dtype), kv[1].astype(q.dtype), idx + 1,
                                           **causal_kw)[:, None]
            if layer is not None:
                new_cache["layer"] = layer
        else:
            if layer_cache is not None:  # prefill: the prompt's keys/values fill the start of the cache
                new_cache = {n: jax.lax.dynamic_update_slice_in_dim(
                    layer_cache[n], jnp.swapaxes(t, 1, 2).astype(layer_cache[n].dtype), 0, axis=2)
                    for n, t in (("k", k), ("v", v))}
            out = kernels.flash_attention(q, k, v, causal=True, prefix_len=ctx["prefix_len"],
                                          segment_ids=ctx["segment_ids"], **causal_kw)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = _dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), cfg.out_bias, "o", axis=(-2, -1))(out)
        return out, new_cache


class MLP(nn.Module):
    """SwiGLU / GeGLU (gated) or plain GELU / ReLU feed-forward."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        if cfg.mlp == "swiglu":
            act = nn.silu
        elif cfg.mlp == "relu":
            act = nn.relu
        else:
            act = lambda h: nn.gelu(h, approximate=cfg.gelu_approximate)  # noqa: E731
        h = _dense(cfg, cfg.d_ff, ("embed", "mlp"), cfg.mlp_bias, "wi")(x)
        if cfg.mlp in ("swiglu", "geglu"):
            gate = _dense(cfg, cfg.d_ff, ("embed", "mlp"), cfg.mlp_bias, "wg")(x)
            h = act(gate) * h
        else:
            h = act(h)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return _dense(cfg, cfg.d_model, ("mlp", "embed"), cfg.mlp_bias, "wo")(h)


class Block(nn.Module):
    """Attention + MLP sub-layers with pre-norm, DeepNorm or parallel residuals (optionally sandwiched by
    post-norms); scanned over layers. `layer` holds this layer's slice of the scanned inputs: its KV cache
    ("cache", prefill) and sliding window ("window"), each None or missing when absent."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, layer: Optional[dict], ctx):
        cfg = self.cfg
        dt = cfg.compute_dtype
        layer = layer or {}

        def post(name, y):
            return make_norm(cfg, name)(y).astype(dt) if cfg.post_norms else y

        h = make_norm(cfg, "attn_norm")(x).astype(dt)
        attn, new_cache = Attention(cfg, name="attn")(h, ctx, layer.get("cache"), layer.get("window"))
        attn = post("attn_post_norm", attn)
        if cfg.residual == "parallel":  # GPT-NeoX: both sub-layers read the block's input
            mlp = MLP(cfg, name="mlp")(make_norm(cfg, "mlp_norm")(x).astype(dt))
            x = x + attn + mlp
        else:
            x = (h * cfg.alpha if cfg.residual == "deepnorm" else x) + attn
            h = make_norm(cfg, "mlp_norm")(x).astype(dt)
            x = (h * cfg.alpha if cfg.residual == "deepnorm" else x) + post("mlp_post_norm", MLP(cfg, name="mlp")(h))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, new_cache


class _CachedBlock(nn.Module):
    """`Block` for decoding: the carry is `(x, whole stacked cache)` and the scanned input the layer index.

    It shares its scope with the `Block` inside, so the parameters are exactly those of the training stack.
    """
    cfg: ModelConfig

    def setup(self):
        self.block = Block(self.cfg)
        nn.share_scope(self, self.block)

    def __call__(self, carry, layer, ctx):
        x, cache = carry
        x, cache = self.block(x, {"cache": {**cache, "layer": layer["index"]}, "window": layer["window"]}, ctx)
        return (x, {"k": cache["k"], "v": cache["v"]}), None


_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}
HEADS = ("lm", "scalar", "lm+scalar")  # the outputs a Transformer can have (see its docstring)


class Transformer(nn.Module):
    """Decoder LM. `head="lm"` gives logits `[B, T, vocab]`; `head="scalar"` the `score` head's values per
    position: `[B, T]` with `cfg.num_labels == 1` (reward model, critic), else class logits `[B, T, num_labels]`
    (a classifier, HF's `*ForSequenceClassification`); `head="lm+scalar"` both, `(logits, scores)`, on one trunk
    (GPT-1's classifier trained with its auxiliary language-modelling loss).

    Call: `Transformer(cfg).apply({"params": params}, tokens)` with optional
      positions: int32 `[B, T]` (`[B, T, 2]` for rope2d); default from `default_positions`.
      prefix_len: int32 `[B]`, GLM prefix-LM (bidirectional prefix); required shape for mask="prefix".
      segment_ids: int32 `[B, T]`, packed sequences; attention never crosses segments.
      cache: a KV cache from `init_cache`; then the call returns `(outputs, new_cache)`. Without
        decode_index it is a prefill (tokens written from position 0); with decode_index (`[B]`) the single
        token of each row is written at, and attends up to, that row's position.
      return_hidden: also return the final normalised hidden states `[B, T, d_model]`.
    """
    cfg: ModelConfig
    head: str = "lm"

    @nn.compact
    def __call__(self, tokens, *, positions=None, prefix_len=None, segment_ids=None, cache: Optional[Cache] = None,
                 decode_index=None, return_hidden: bool = False) -> Any:
        cfg = self.cfg
        if self.head not in HEADS:
            raise ValueError(f"Transformer head must be one of {HEADS}, got {self.head!r}")
        b, t = tokens.shape
        if cfg.mask == "causal":
            prefix_len = None
        if positions is None:
            positions = default_positions(cfg, b, t, decode_index, prefix_len)
        n_virtual = cfg.virtual_tokens
        decoding = cache is not None and decode_index is not None
        if n_virtual:
            # Prompt/prefix tuning: n virtual tokens at positions 0..n-1 in front of every row; the real tokens
            # (and a decode step's cache slot) move n places on.
            if segment_ids is not None:
                raise ValueError("prompt/prefix tuning tokens cannot go in front of packed sequences "
                                 "(segment_ids); set data.pack=False")
            positions = positions + (n_virtual if positions.ndim == 2 else jnp.asarray([n_virtual, 0]))
            if decoding:
                decode_index = decode_index + n_virtual
            elif prefix_len is not None:
                prefix_len = prefix_len + n_virtual

        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                         embedding_init=_init(cfg, ("vocab", "embed")), name="embed")
        x = embed(tokens)
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
        if cfg.embed_grad_scale != 1.0:
            a = cfg.embed_grad_scale
            x = x * a + jax.lax.stop_gradient(x) * (1.0 - a)
        if n_virtual and not decoding:
            if cfg.prompt_tokens:
                virtual = self.param("soft_prompt", _init(cfg, ("length", "embed")), (n_virtual, cfg.d_model),
                                     ADAPTER_DTYPE).astype(x.dtype)
            else:  # prefix tuning: the inputs there do not matter, each layer's keys/values are replaced
                virtual = jnp.zeros((n_virtual, cfg.d_model), x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(virtual, (b, n_virtual, cfg.d_model)), x], axis=1)
            first = default_positions(cfg, b, n_virtual)
            positions = jnp.concatenate([first, positions], axis=1)
        if cfg.position == "learned":
            pos_table = self.param("pos_embed", _init(cfg, ("length", "embed")),
                                   (cfg.max_len + cfg.pos_offset, cfg.d_model), cfg.params_dtype)
            x = x + jnp.take(pos_table, positions + cfg.pos_offset, axis=0).astype(cfg.compute_dtype)
        if cfg.embed_norm:
            x = make_norm(cfg, "embed_norm")(x)
        x = nn.with_logical_constraint(x.astype(cfg.compute_dtype), ("batch", "length", "embed"))

        ctx = {"positions": positions, "prefix_len": prefix_len, "segment_ids": segment_ids,
               "decode_index": decode_index}
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, prevent_cse=False, policy=_REMAT_POLICIES[cfg.remat])
        scan = functools.partial(nn.scan, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                                 in_axes=(0, nn.broadcast), length=cfg.n_layers,
                                 unroll=min(cfg.scan_unroll or cfg.n_layers, cfg.n_layers),
                                 metadata_params={nn.PARTITION_NAME: "layers"})
        windows = cfg.layer_windows()
        windows = None if windows is None else jnp.asarray(windows, jnp.int32)  # [n_layers]
        if decoding and isinstance(cache["k"], (tuple, list)):
            # Unstacked (`unstack_layers`, `unstack_cache`): one block per layer, each with its own parameters and
            # cache arrays, none of them sliced out of a stack at every step.
            ks, vs = [], []
            for i in range(cfg.n_layers):
                layer = {"cache": {"k": cache["k"][i], "v": cache["v"][i]},
                         "window": None if windows is None else windows[i]}
                x, c = Block(cfg, name=f"{UNSTACKED}{i}")(x, layer, ctx)
                ks.append(c["k"])
                vs.append(c["v"])
            new_cache = {"k": tuple(ks), "v": tuple(vs)}
        elif decoding:
            # Carrying the cache (not scanning over it) lets XLA update it in place at every decode step.
            layers = {"index": jnp.arange(cfg.n_layers), "window": windows}
            (x, new_cache), _ = scan(_CachedBlock)(cfg, name="layers")((x, cache), layers, ctx)
        else:
            x, new_cache = scan(block)(cfg, name="layers")(x, {"cache": cache, "window": windows}, ctx)
        x = make_norm(cfg, "final_norm")(x)
        if n_virtual and not decoding:
            x = x[:, n_virtual:]

        outs = []
        if self.head != "scalar":
            if cfg.tie_embeddings:
                logits = embed.attend(x.astype(cfg.compute_dtype)).astype(jnp.float32)
            else:
                logits = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), False, "lm_head")(x.astype(cfg.compute_dtype))
                logits = logits.astype(jnp.float32)
            if cfg.final_softcap is not None:
                logits = kernels.reference.softcap(logits, cfg.final_softcap)
            outs.append(nn.with_logical_constraint(logits, ("batch", "length", "vocab")))
        if self.head != "lm":
            head_dtype = ADAPTER_DTYPE if cfg.has_adapters else None  # trained beside the adapters
            scores = _dense(cfg, cfg.num_labels, ("embed", None), True, "score", param_dtype=head_dtype)(
                x.astype(cfg.compute_dtype)).astype(jnp.float32)
            outs.append(scores[..., 0] if cfg.num_labels == 1 else scores)
        out = outs[0] if len(outs) == 1 else tuple(outs)
        if return_hidden:
            out = (out, x)
        return (out, new_cache) if cache is not None else out


def dropout_rngs(cfg: ModelConfig, rng) -> Optional[dict]:
    """The `rngs` of a training forward pass: `{"dropout": rng}` when the model has LoRA dropout and `rng` is
    given (a loss function gets `rng=None` in evaluation), else None (deterministic)."""
    return {"dropout": rng} if rng is not None and cfg.lora_dropout else None


def init_cache(cfg: ModelConfig, batch: int, max_len: Optional[int] = None, dtype=None) -> Cache:
    """Zeroed KV cache `{"k", "v"}: [n_layers, B, n_kv_heads, max_len + virtual tokens, head_dim]`."""
    shape = (cfg.n_layers, batch, cfg.kv_heads, (max_len or cfg.max_len) + cfg.virtual_tokens, cfg.dim_per_head)
    dtype = dtype or cfg.compute_dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


UNSTACKED = "layer_"  # parameter scope of layer i in unstacked parameters: f"layer_{i}"


def unstack_layers(params) -> dict:
    """Parameters with the scanned block stack `layers` (every leaf `[L, ...]`) split into `layer_0` ...
    `layer_{L-1}`: what a decode step with an unstacked cache reads. A copy of the block weights."""
    stack = params["layers"]
    n = jax.tree.leaves(stack)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    out.update({f"{UNSTACKED}{i}": jax.tree.map(lambda a, i=i: a[i], stack) for i in range(n)})
    return out


def unstack_cache(cache: Cache) -> Cache:
    """A stacked cache `[L, B, Hkv, S, D]` as tuples of L arrays `[B, Hkv, S, D]`."""
    return {n: tuple(cache[n][i] for i in range(cache[n].shape[0])) for n in ("k", "v")}


def boxed_params(cfg: ModelConfig, rng, head: str = "lm", batch: int = 1, length: int = 8):
    """Randomly initialised parameters of `Transformer(cfg, head)`, boxed with their logical axis names.

    The one init of the codebase: unbox it (`init_params`), `jax.eval_shape` it for shapes and shardings
    (`abstract_params`), or hand `functools.partial(boxed_params, cfg)` to a trainer as its `rng -> params`.
    """
    tokens = jnp.zeros((batch, length), jnp.int32)
    return Transformer(cfg, head=head).init(rng, tokens, prefix_len=jnp.zeros((batch,), jnp.int32))["params"]


def init_params(cfg: ModelConfig, rng, head: str = "lm", batch: int = 1, length: int = 8):
    """Randomly initialised, unboxed parameters of `Transformer(cfg, head)`."""
    return nn.unbox(boxed_params(cfg, rng, head, batch, length))


def abstract_params(cfg: ModelConfig, head: str = "lm", mesh=None, rules=None):
    """`jax.ShapeDtypeStruct`s of `Transformer(cfg, head)`'s parameters (nothing is allocated).

    With a `mesh`, each carries its sharding under the logical-axis `rules` (default lm.sharding.RULES): the
    restore target of a checkpoint on that mesh.
    """
    boxed = jax.eval_shape(functools.partial(boxed_params, cfg, head=head), jax.random.key(0))
    if mesh is None:
        return nn.unbox(boxed)
    shardings = sharding.tree_shardings(boxed, mesh, sharding.RULES if rules is None else rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)


def scalar_params(params: dict) -> dict:
    """The params of `Transformer(cfg, head="scalar")` within those of an "lm" or "lm+scalar" model: all but
    the language-model head `lm_head` (a scalar model reads the trunk and its `score` head only)."""
    return {k: v for k, v in params.items() if k != "lm_head"}


def with_score_head(cfg: ModelConfig, lm_params, rng, head: str = "scalar", zeros: bool = False):
    """Parameters of `Transformer(cfg, head)` (head "scalar" or "lm+scalar") whose trunk is a copy of `lm_params`
    (a language model's) and whose `score` head is new: kernel `[d_model, cfg.num_labels]` drawn N(0, init_std),
    or zeros with `zeros` (a critic that starts at 0), and a zero bias. Head "scalar" drops the LM head.

    The copy leaves `lm_params` untouched (and donatable); a trunk leaf the model needs but `lm_params` lacks is
    an error naming it.
    """
    if head not in ("scalar", "lm+scalar"):
        raise ValueError(f"with_score_head: head must be 'scalar' or 'lm+scalar', got {head!r}")
    fresh = abstract_params(cfg, head)
    trunk = {k: v for k, v in lm_params.items() if k in fresh}
    missing = sorted(set(fresh) - set(trunk) - {"score"})
    if missing:
        raise ValueError(f"with_score_head: the language model's params lack {missing}, needed by {cfg}")
    shape = fresh["score"]["kernel"].shape
    kernel = jnp.zeros(shape, cfg.params_dtype) if zeros else cfg.init_std * jax.random.normal(rng, shape,
                                                                                                cfg.params_dtype)
    trunk = jax.tree_util.tree_map(jnp.array, trunk)
    return {**trunk, "score": {"kernel": kernel, "bias": jnp.zeros(shape[1:], cfg.params_dtype)}}


def count_params(cfg: ModelConfig, head: str = "lm") -> int:
    """Number of parameters, computed with `jax.eval_shape` (nothing is allocated)."""
    shapes = jax.eval_shape(lambda r: init_params(cfg, r, head), jax.random.key(0))
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(shapes))

"""PEFT: int8/NF4 block quantisation vs a NumPy loop reference, LoRA (zero init, merging, QLoRA base), prompt and
prefix tuning through the KV cache, adapter-only gradients, and the config checks."""
import functools
from statistics import NormalDist

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lm
from lm import init_params, peft, presets, quant
from lm.config import LORA_TARGETS, QUANT_TARGETS
from lm.generation import pad_prompts, sample
from lm.model import Dense, Transformer, count_params, init_cache
from random_weights import random_params

ALL_TARGETS = ",".join(LORA_TARGETS)
RANK = 4
VIRTUAL = 3  # prompt/prefix tokens
TOKENS = np.random.default_rng(0).integers(1, 512, size=(2, 12)).astype(np.int32)
PREFIX_LEN = np.array([5, 9], np.int32)  # GLM's bidirectional prefix; causal models ignore it


def lora_config(name, method="lora", fmt="nf4"):
    """`name`'s preset with rank-4 LoRA on every projection (and lm_head), its base stored `fmt` for qlora."""
    return peft.adapt(presets.get(name), peft.PeftConfig(method=method, rank=RANK, alpha=8.0, targets=ALL_TARGETS,
                                                         quant=fmt))


@functools.partial(jax.jit, static_argnames=("cfg",))
def logits(cfg, params, tokens, prefix_len):
    return Transformer(cfg).apply({"params": params}, tokens, prefix_len=prefix_len)


quantize_base = jax.jit(peft.quantize_base, static_argnums=0)


def leaves_by_name(tree):
    """`{"layers/attn/q/lora_a": array, ...}` of a nested param dict (boxed leaves stay boxed)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat}


def lora_modules(tree):
    return {name.split("/")[-2] for name in leaves_by_name(tree) if name.endswith("lora_a")}


def rel_err(got, want):
    return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))


# ---------------------------------------------------------------- quantisation vs a NumPy loop reference


def np_quantize(w, fmt, block, axis):
    """`(codes, scale)` written out block by block: blocks of `block` (or the whole axis) consecutive entries
    along `axis`, absmax scale each; int8 `round(127 w / absmax)`; int4 `round(7 w / absmax) + 8`; nf4 the
    nearest level's index; 4-bit codes packed in pairs along `axis` with the even entry in the low nibble."""
    w = np.moveaxis(np.asarray(w, np.float32), axis, -1)
    k = w.shape[-1]
    b = min(block, k)
    rows = w.reshape(-1, k)
    codes = np.zeros(rows.shape, np.int64)
    scale = np.zeros((rows.shape[0], k // b), np.float32)
    for r in range(rows.shape[0]):
        for j in range(k // b):
            blk = rows[r, j * b:(j + 1) * b]
            absmax = np.abs(blk).max()
            scale[r, j] = absmax
            unit = blk / absmax if absmax > 0 else np.zeros_like(blk)
            for i, u in enumerate(unit):
                if fmt == "int8":
                    codes[r, j * b + i] = np.round(np.float32(127) * u)
                elif fmt == "int4":
                    codes[r, j * b + i] = np.round(np.float32(7) * u) + 8
                else:
                    codes[r, j * b + i] = np.argmin(np.abs(quant.NF4_LEVELS - u))
    if fmt == "int8":
        codes = codes.astype(np.int8)
    else:
        codes = np.array([[row[i] | (row[i + 1] << 4) for i in range(0, k, 2)] for row in codes], np.uint8)
    codes = np.moveaxis(codes.reshape(w.shape[:-1] + codes.shape[-1:]), -1, axis)
    return codes, np.moveaxis(scale.reshape(w.shape[:-1] + (k // b,)), -1, axis)


def np_dequantize(codes, scale, fmt, axis):
    """The float kernel of `np_quantize`'s output, entry by entry."""
    codes, scale = np.moveaxis(codes, axis, -1), np.moveaxis(scale, axis, -1)
    if fmt in ("nf4", "int4"):
        codes = np.stack([codes & 15, codes >> 4], axis=-1).reshape(codes.shape[:-1] + (-1,))
    b = codes.shape[-1] // scale.shape[-1]
    out = np.zeros(codes.shape, np.float32)
    for idx in np.ndindex(codes.shape):
        level = {"int8": lambda c: np.float32(c) / np.float32(127),
                 "int4": lambda c: np.float32(int(c) - 8) / np.float32(7),
                 "nf4": lambda c: quant.NF4_LEVELS[c]}[fmt](codes[idx])
        out[idx] = level * scale[idx[:-1] + (idx[-1] // b,)]
    return np.moveaxis(out, -1, axis)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def quantize_roundtrip(w, fmt, block, axis):
    """`(codes, scale, dequantised)` of `w`: one compilation per case."""
    codes, scale = quant.quantize(w, fmt, block, axis)
    return codes, scale, quant.dequantize(codes, scale, fmt, axis)


# (shape, block, axis): several blocks per axis, axis not 0 and negative, a block longer than the axis (the whole
# axis of 24) and one equal to it (12).
QUANT_CASES = [((64, 6), 16, 0), ((3, 32, 5), 8, 1), ((6, 24), 64, -1), ((4, 2, 12, 3), 12, 2)]


def test_nf4_levels_are_normal_quantiles():
    # bitsandbytes' create_normal_map: 8 positive and 7 negative N(0, 1) quantiles from 0.5 up to
    # offset 0.9677083, an exact 0, all divided by the largest.
    ppf = NormalDist().inv_cdf
    pos = [ppf(p) for p in np.linspace(0.9677083, 0.5, 9)[:-1]]
    neg = [-ppf(p) for p in np.linspace(0.9677083, 0.5, 8)[:-1]]
    want = np.sort(pos + [0.0] + neg) / max(pos)
    np.testing.assert_allclose(quant.NF4_LEVELS, want, rtol=0, atol=1e-6)
    assert quant.NF4_LEVELS[7] == 0.0


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("shape,block,axis", QUANT_CASES)
def test_quantize_matches_numpy_loops(fmt, shape, block, axis):
    rng = np.random.default_rng(len(shape) * 100 + block)
    w = (rng.standard_t(4, size=shape) * 0.05).astype(np.float32)  # heavy tails: absmax varies by block
    b = min(block, shape[axis])
    zero = [0] * len(shape)
    zero[axis] = slice(0, b)
    w[tuple(zero)] = 0.0  # one all-zero block
    codes, scale, got = quantize_roundtrip(w, fmt, block, axis)
    want_codes, want_scale = np_quantize(w, fmt, block, axis)
    assert (codes.shape, codes.dtype, scale.shape) == quant.shapes(shape, fmt, block, axis)
    assert codes.dtype == want_codes.dtype and scale.dtype == np.float32
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(scale, want_scale)

    got = np.asarray(got)
    # XLA may divide by 127 as a multiply by 1/127: one float32 rounding apart.
    np.testing.assert_allclose(got, np_dequantize(want_codes, want_scale, fmt, axis), rtol=2 * np.finfo(np.float32).eps,
                               atol=0)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[tuple(zero)], 0.0)
    # Half a step per block: int8's step is absmax / 127; NF4's widest gap is between 0.72 and 1. The 1e-6
    # relative slack is float32 rounding of `w / absmax` and `level * absmax`, not quantisation error.
    absmax = np.repeat(np.asarray(scale), b, axis=axis % len(shape))
    half = {"int8": 1 / 254, "int4": 1 / 14, "nf4": np.diff(quant.NF4_LEVELS).max() / 2}[fmt]
    err = np.abs(got - w)
    assert (err <= absmax * (half + 1e-6)).all(), float((err / np.maximum(absmax, 1e-30)).max())
    assert err.max() > absmax.max() * half / 10  # really rounded


@pytest.mark.parametrize("dim,block", [(24, 5), (24, 3), (7, 64), (24, 0), (24, -2)])
def test_bad_block_sizes_raise(dim, block):
    with pytest.raises(ValueError, match="blocks of"):
        quant.shapes((dim, 4), "int8", block, 0)
    with pytest.raises(ValueError, match="blocks of"):
        quant.quantize(np.ones((4, dim), np.float32), "nf4", block, 1)


def test_unknown_format_raises():
    with pytest.raises(ValueError, match="fp8"):
        quant.quantize(np.ones((4, 8), np.float32), "fp8", 4, 1)
    with pytest.raises(ValueError, match="fp8"):
        peft.PeftConfig(method="qlora", quant="fp8")


# ---------------------------------------------------------------- LoRA


def zero_b(trainable):
    """`trainable` with every LoRA B zero (the init), A as given."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if path[-1].key == "lora_b" else x, trainable)


@pytest.mark.parametrize("name", ["llama-tiny", "qwen3-tiny", "glm-tiny"])
def test_zero_lora_b_leaves_logits_unchanged(name):
    cfg = lora_config(name)
    base, trainable = peft.split(random_params(cfg, seed=1))
    # Every requested projection the model has gets adapters (tied models have no lm_head, GELU MLPs no wg).
    has = {path.split("/")[-2] for path in leaves_by_name(base) if path.endswith("kernel")}
    assert lora_modules(trainable) == set(LORA_TARGETS) & has
    assert ("lm_head" in has) == (not cfg.tie_embeddings)
    want = logits(presets.get(name), base, TOKENS, PREFIX_LEN)
    got = logits(cfg, peft.merge(base, zero_b(trainable)), TOKENS, PREFIX_LEN)
    np.testing.assert_array_equal(got, want)
    assert np.abs(logits(cfg, peft.merge(base, trainable), TOKENS, PREFIX_LEN) - want).max() > 0.1  # B != 0 counts


def test_lora_init_is_peft():
    cfg = lora_config("llama-tiny")
    boxed = leaves_by_name(jax.eval_shape(functools.partial(peft.boxed_trainable, cfg), jax.random.key(0)))
    assert boxed["lm_head/lora_b"].names == ("lora", "vocab")
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 16)).astype(np.float32)
    for module, features, names, n_in in [("q", (4, 16), ("embed", "heads", "head_dim"), 1),
                                          ("o", (64,), ("heads", "head_dim", "embed"), 2)]:
        layer = Dense(cfg, features, names, False, n_in, name=module)
        params = jax.jit(layer.init)(jax.random.key(0), x.reshape(2, 3, 64) if n_in == 1 else x)["params"]
        assert params["lora_a"].names == names[:n_in] + ("lora",)
        assert params["lora_b"].names == ("lora",) + names[n_in:]
        # The whole model's boxed trainable leaves carry the same names, with the layer axis in front.
        assert boxed[f"layers/attn/{module}/lora_a"].names == ("layers",) + params["lora_a"].names
        a, b = np.asarray(params["lora_a"].value), np.asarray(params["lora_b"].value)
        assert (a.shape, b.shape) == (((64,) if n_in == 1 else (4, 16)) + (RANK,), (RANK,) + features)
        np.testing.assert_array_equal(b, 0.0)
        # PEFT's kaiming-uniform(a=sqrt(5)) A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in the input dims (64).
        assert 0.9 / 8 < np.abs(a).max() <= 1 / 8 and abs(a.mean()) < 0.01


@pytest.mark.parametrize("name,fmt", [("qwen3-tiny", None), ("llama-tiny", "int8"), ("llama-tiny", "nf4")])
def test_merge_lora_matches_adapters(name, fmt):
    cfg = lora_config(name)
    params = random_params(cfg, seed=1)
    base = logits(presets.get(name), peft.split(params)[0], TOKENS, PREFIX_LEN)
    if fmt:
        cfg = lora_config(name, "qlora", fmt)
        params = quantize_base(cfg, params)
    want = np.asarray(logits(cfg, params, TOKENS, PREFIX_LEN))
    merged_cfgs = []

    def merge(p):
        merged_cfg, merged = peft.merge_lora(cfg, p)
        merged_cfgs.append(merged_cfg)
        return merged

    merged = jax.jit(merge)(params)
    merged_cfg = merged_cfgs[0]
    assert merged_cfg == peft.merged_config(cfg) and (merged_cfg.lora_rank, merged_cfg.quant) == (0, "none")
    merged_cfg.check_same_model(presets.get(name), "the merged model")  # the preset it started from
    shapes = jax.eval_shape(lambda k: init_params(merged_cfg, k), jax.random.key(0))
    assert jax.tree.structure(merged) == jax.tree.structure(shapes)
    assert all(a.shape == s.shape and a.dtype == s.dtype for a, s in zip(jax.tree.leaves(merged),
                                                                         jax.tree.leaves(shapes)))
    got = logits(merged_cfg, merged, TOKENS, PREFIX_LEN)
    print(f"merge {name} {fmt}: max |merged - adapters| = {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(base - want).max() > 0.1  # the adapters moved the logits far more than the tolerance


# QLoRA's frozen base at the start of training (adapters zero) vs the float base, llama-tiny with std-0.1 weights:
# measured relative logit errors (||q - f|| / ||f||) are 0.017 for int8 and 0.25 for nf4, 15x apart, as the
# kernels' own relative RMS errors are (0.0059 and 0.092 for N(0, 1) weights in blocks of 64: a step of
# absmax / 127 against NF4 gaps of 0.08-0.28 absmax), not 100x; int4 (uniform levels, step absmax / 7) 0.28.
# Bounds: 1.5x the measurements; the ratio >= 8x.
QUANT_LOGIT_ERR = {"int8": 0.025, "int4": 0.42, "nf4": 0.37}


def test_quantised_base_logits_close_to_float():
    cfg = lora_config("llama-tiny")
    base, trainable = peft.split(random_params(cfg, seed=1))
    params = peft.merge(base, zero_b(trainable))
    want = np.asarray(logits(presets.get("llama-tiny"), base, TOKENS, PREFIX_LEN))
    err = {}
    for fmt in quant.FORMATS:
        qcfg = lora_config("llama-tiny", "qlora", fmt)
        qparams = quantize_base(qcfg, params)
        got = logits(qcfg, qparams, TOKENS, PREFIX_LEN)
        err[fmt] = rel_err(got, want)
    print(f"relative logit error of the quantised base: {err}")
    for fmt, bound in QUANT_LOGIT_ERR.items():
        assert 0 < err[fmt] < bound, (fmt, err[fmt])
    assert err["nf4"] > 8 * err["int8"]


def test_split_merge_and_abstract_base():
    cfg = lora_config("llama-tiny", "qlora", "nf4")
    params = quantize_base(cfg, random_params(lora_config("llama-tiny"), seed=1))
    base, trainable = peft.split(params)
    assert set(p.split("/")[-1] for p in leaves_by_name(trainable)) == {"lora_a", "lora_b"}
    assert not set(p.split("/")[-1] for p in leaves_by_name(base)) & set(peft.ADAPTER_LEAVES)
    assert lora_modules(trainable) == set(LORA_TARGETS)
    merged = peft.merge(base, trainable)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)))  # no copies
    want = leaves_by_name(base)
    got = leaves_by_name(peft.abstract_base(cfg))
    assert got.keys() == want.keys()
    for path, leaf in want.items():
        assert (got[path].shape, got[path].dtype) == (leaf.shape, leaf.dtype), path
    # Every layer projection, and nothing else, is stored as codes + scales.
    assert {p.split("/")[-2] for p, leaf in want.items() if leaf.dtype == np.uint8} == set(QUANT_TARGETS)
    assert {p.split("/")[-2] for p in want if p.endswith("kernel_scale")} == set(QUANT_TARGETS)
    assert want["layers/attn/q/kernel"].shape == (2, 32, 4, 16)  # [L, E / 2 (two codes a byte), H, D]
    assert want["layers/attn/o/kernel_scale"].shape == (2, 4, 1, 64)  # one block of head_dim 16 < 64


def test_trainable_fraction_counts_adapters():
    cfg = peft.adapt(presets.get("llama-tiny"), peft.PeftConfig(method="lora", rank=RANK, targets="q,v"))
    # q: 64 -> 4 x 16, v: 64 -> 2 x 16, two layers; each adapter has r (in + out) entries.
    adapters = 2 * RANK * ((64 + 64) + (64 + 32))
    base = count_params(presets.get("llama-tiny"))
    assert peft.trainable_fraction(cfg) == pytest.approx(adapters / (base + adapters), rel=1e-12)
    assert peft.trainable_fraction(presets.get("llama-tiny")) == 0.0


# ---------------------------------------------------------------- prompt and prefix tuning

PROMPTS = [[5, 17, 42, 9, 301, 77, 12], [3, 250], [8, 8, 100, 64]]
N_NEW = 5


def negate_virtual(params):
    """`params` with the soft prompt / prefixes negated (not scaled: a LayerNorm would undo a scale)."""
    virtual = ("soft_prompt", "prefix_k", "prefix_v")
    return jax.tree_util.tree_map_with_path(lambda path, x: -x if path[-1].key in virtual else x, params)


# Each family with one method (each case compiles a sampler and a forward, ~4 s): the soft prompt through RoPE and a
# causal mask; prefixes (ChatGLM's P-tuning v2) through 2D RoPE and the bidirectional prefix.
@pytest.mark.parametrize("name,method", [("llama-tiny", "prompt"), ("glm-tiny", "prefix")])
def test_virtual_tokens_greedy_sample_matches_full_forward(name, method):
    cfg = peft.adapt(presets.get(name), peft.PeftConfig(method=method, virtual_tokens=VIRTUAL))
    params = random_params(cfg, seed=5, std=0.3)
    assert init_cache(cfg, 2, 8)["k"].shape[3] == 8 + VIRTUAL
    tokens, lengths = pad_prompts(PROMPTS, 8)
    out = sample(cfg, params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0), max_new_tokens=N_NEW,
                 temperature=0.0)
    assert out.tokens.shape == (len(PROMPTS), N_NEW)
    np.testing.assert_array_equal(out.mask, 1.0)

    full = np.zeros((len(PROMPTS), 8 + N_NEW), np.int32)
    for b, p in enumerate(PROMPTS):
        full[b, :len(p) + N_NEW] = np.concatenate([p, out.tokens[b]])
    want = np.asarray(logits(cfg, params, full, lengths))
    assert want.shape == full.shape + (cfg.vocab_size,)  # the virtual positions are cut off
    for b, n in enumerate(lengths):
        step = want[b, n - 1:n - 1 + N_NEW]  # the logits that predict each generated token
        np.testing.assert_array_equal(out.tokens[b], step.argmax(-1))
        logp = jax.nn.log_softmax(step)[np.arange(N_NEW), out.tokens[b]]
        np.testing.assert_allclose(out.logprobs[b], logp, rtol=0, atol=1e-5)
    # The virtual tokens matter: other prompt/prefix values give other logits.
    assert np.abs(logits(cfg, negate_virtual(params), full, lengths) - want).max() > 0.1
    # The first real token sees the last prompt token only through GLM's bidirectional prefix, which still covers
    # the whole prompt behind the virtual tokens.
    changed = full.copy()
    changed[np.arange(len(PROMPTS)), lengths - 1] += 1
    first = np.abs(logits(cfg, params, changed, lengths)[:, 0] - want[:, 0]).max(-1)
    assert (first > 0).all() if cfg.mask == "prefix" else (first == 0).all()

    with pytest.raises(ValueError, match="segment_ids"):
        Transformer(cfg).apply({"params": params}, full, segment_ids=np.ones_like(full))


def test_soft_prompt_is_a_prompt_of_embeddings():
    """A soft prompt made of token embeddings is those tokens put in front: same positions, same logits."""
    cfg = peft.adapt(presets.get("llama-tiny"), peft.PeftConfig(method="prompt", virtual_tokens=VIRTUAL))
    params = random_params(cfg, seed=5, std=0.3)
    virtual = np.array([7, 300, 41])
    params["soft_prompt"] = params["embed"]["embedding"][virtual]
    prompts, lengths = pad_prompts(PROMPTS, 8)
    tokens = np.pad(prompts, ((0, 0), (0, N_NEW)))  # the shape the sampling test compiled
    got = logits(cfg, params, tokens, lengths)
    both = np.concatenate([np.broadcast_to(virtual, (len(PROMPTS), VIRTUAL)), tokens], axis=1)
    want = logits(presets.get("llama-tiny"), peft.split(params)[0], both, lengths)[:, VIRTUAL:]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- gradients reach only the adapters


def lm_loss(params, cfg, tokens):
    """Mean next-token cross-entropy."""
    out = Transformer(cfg).apply({"params": params}, tokens)
    logp = jax.nn.log_softmax(out[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@functools.partial(jax.jit, static_argnames=("cfg",))
def trainable_grads(trainable, base, cfg, tokens):
    """dL/d(trainable leaves); the base is closed over, a constant of the differentiated function."""
    return jax.grad(lambda t: lm_loss(peft.merge(base, t), cfg, tokens))(trainable)


def nonzero_per_layer(path, g):
    """Whether each layer's slice of the gradient `g` (or the whole of an unstacked one) has a non-zero."""
    g = np.abs(np.asarray(g))
    return g.reshape(len(g) if path.startswith("layers/") else 1, -1).max(-1) > 0


def test_grads_reach_every_adapter_and_only_them():
    cfg = lora_config("llama-tiny").replace(prefix_tokens=VIRTUAL)
    base, trainable = peft.split(random_params(cfg, seed=6))
    assert {p.split("/")[-1] for p in leaves_by_name(trainable)} == {"lora_a", "lora_b", "prefix_k", "prefix_v"}
    assert lora_modules(trainable) == set(LORA_TARGETS)

    # With B random every adapter leaf, in every layer, gets a gradient.
    grads = trainable_grads(trainable, base, cfg, TOKENS)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    for path, g in leaves_by_name(grads).items():
        assert nonzero_per_layer(path, g).all(), path

    # At init (B = 0) A gets no gradient (dL/dA = s dL/dW B^T) and B still does.
    grads = trainable_grads(zero_b(trainable), base, cfg, TOKENS)
    for path, g in leaves_by_name(grads).items():
        if path.endswith("lora_a"):
            np.testing.assert_array_equal(g, 0.0)
        else:
            assert nonzero_per_layer(path, g).all(), path


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize("changes,field", [
    (dict(lora_rank=4, lora_targets="q,proj"), "lora_targets"),
    (dict(prompt_tokens=4, prefix_tokens=4), "prompt_tokens"),
    (dict(lora_rank=-1), "lora_rank"),
    (dict(prefix_tokens=-2), "prefix_tokens"),
    (dict(lora_rank=4, lora_targets=" , "), "lora_targets"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(quant="int3"), "quant"),
    (dict(quant_block=1), "quant_block"),
])
def test_model_config_rejects_bad_peft_fields(changes, field):
    with pytest.raises(ValueError, match=field):
        presets.get("llama-tiny", **changes)


def test_adapt_and_peft_config_checks():
    with pytest.raises(ValueError, match="method"):
        peft.PeftConfig(method="ia3")
    adapted = lora_config("llama-tiny")
    with pytest.raises(ValueError, match="already has adapters"):
        peft.adapt(adapted, peft.PeftConfig(method="prefix"))
    assert peft.adapt(adapted, peft.PeftConfig()) is adapted
    assert peft.base_config(adapted).lora_rank == 0 and peft.enabled(adapted)
    # A quantised layer whose axis does not split into blocks is named.
    cfg = lora_config("llama-tiny", "qlora", "int8").replace(quant_block=6)
    with pytest.raises(ValueError, match="kernel"):
        jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def test_weight_only_quantised_inference():
    cfg = presets.get("llama-tiny")
    params = random_params(cfg, seed=1)
    want = np.asarray(logits(cfg, params, TOKENS, PREFIX_LEN))
    for fmt in quant.FORMATS:
        qcfg, qparams = lm.quantize(cfg, params, fmt, 16)
        assert qcfg.quant == fmt and qparams["layers"]["mlp"]["wi"]["kernel"].dtype == quant.shapes(
            (64, 128), fmt, 16, 0)[1]
        assert 0 < rel_err(logits(qcfg, qparams, TOKENS, PREFIX_LEN), want) < QUANT_LOGIT_ERR[fmt]
    assert len(lm.generate(qcfg, qparams, [[3, 4, 5]], 3)[0]) == 3  # the KV-cache path takes it as it is
    with pytest.raises(ValueError, match="already"):
        lm.quantize(qcfg, qparams, "int8")


def test_w8a8_codes_and_integer_matmul_match_numpy():
    """w8a8: one scale per output column over all contracting axes (o's [H, D, E] kernel: over H and D), and the
    matmul rounds each activation row to int8 and sums integer products exactly."""
    rng = np.random.default_rng(3)
    w = (rng.standard_t(4, size=(3, 8, 5)) * 0.05).astype(np.float32)
    w[:, :, 1] = 0.0  # an all-zero column
    codes, scale = quant.quantize(w, quant.W8A8, 64, axis=1, n_in=2)
    assert (codes.shape, codes.dtype, scale.shape) == quant.shapes(w.shape, quant.W8A8, 64, 1, n_in=2)
    absmax = np.abs(w).max(axis=(0, 1), keepdims=True)
    np.testing.assert_array_equal(scale, absmax)
    want = np.clip(np.round(127 * w / np.where(absmax > 0, absmax, 1)), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(codes, want)
    err = np.abs(np.asarray(quant.dequantize(codes, scale, quant.W8A8, 1)) - w)
    assert (err <= absmax * (1 / 254 + 1e-6)).all()

    x = rng.standard_normal((4, 24)).astype(np.float32)
    x[2] = 0.0  # an all-zero row
    c2, s2 = np.asarray(codes).reshape(24, 5), np.asarray(scale).reshape(5)
    row = np.abs(x).max(-1, keepdims=True)
    xq = np.round(127 * x / np.where(row > 0, row, 1)).astype(np.int64)
    want = (xq @ c2.astype(np.int64)) * (row / 127) * (s2 / 127)  # exact integer sums, then the two scales
    got = np.asarray(quant.matmul_w8a8(x, c2, s2))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.abs(got - x @ w.reshape(24, 5)).max() < 0.02 * np.abs(x @ w.reshape(24, 5)).max()


def test_w8a8_and_quantised_head_inference():
    """lm.quantize's w8a8, with and without the output head: logits near float32's (error printed), greedy
    decoding through the KV cache, and the head's codes; a tied head or QLoRA on w8a8 are refused."""
    cfg = presets.get("llama-tiny")
    params = random_params(cfg, seed=1)
    want = np.asarray(logits(cfg, params, TOKENS, PREFIX_LEN))
    err = {}
    for head in (False, True):
        qcfg, qparams = lm.quantize(cfg, params, "w8a8", head=head)
        assert qparams["lm_head"]["kernel"].dtype == (np.int8 if head else np.float32)
        assert qparams["layers"]["attn"]["o"]["kernel_scale"].shape == (cfg.n_layers, 1, 1, cfg.d_model)
        err[head] = rel_err(logits(qcfg, qparams, TOKENS, PREFIX_LEN), want)
        assert len(lm.generate(qcfg, qparams, [[3, 4, 5]], 3)[0]) == 3
    print(f"relative logit error of w8a8 (head too): {err}")
    assert 0 < err[False] < QUANT_LOGIT_ERR["int8"] * 2 and err[False] < err[True] < QUANT_LOGIT_ERR["int8"] * 3
    with pytest.raises(ValueError, match="quant_head"):
        lm.quantize(presets.get("gemma2-tiny"), random_params(presets.get("gemma2-tiny"), seed=1), "int8", head=True)
    with pytest.raises(ValueError, match="w8a8"):
        peft.PeftConfig(method="qlora", quant="w8a8")

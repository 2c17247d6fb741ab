"""Whole tiny models with `attention_impl="pallas"` (interpret mode on CPU) against `"xla"`."""
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import presets
from lm.generation import generate
from lm.kernels import pallas, reference
from lm.model import Transformer, init_params

B, T = 2, 24
WINDOWED_T = 40  # longer than the tiny presets' 16-token sliding window


def _params(cfg, seed):
    """Random parameters of the right tree and shapes, drawn in NumPy (an eager flax init costs seconds of
    compiles on CPU); norm scales near 1, everything else N(0, 0.1^2) so that biases are non-zero."""
    rng = np.random.RandomState(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))

    def draw(path, leaf):
        base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(base + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def _batch(cfg):
    """Tokens and mask inputs; rows longer than the sliding window where the config has one."""
    t = T if cfg.sliding_window is None else WINDOWED_T
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (B, t)), jnp.int32)
    kw = {}
    if cfg.mask == "prefix":
        kw["prefix_len"] = jnp.array([5, 17], jnp.int32)
    else:  # packed rows: two sequences in the first, one plus padding (id 0) in the second
        kw["segment_ids"] = jnp.asarray([[1] * 10 + [2] * (t - 10), [1] * (t - 5) + [0] * 5], jnp.int32)
    return tokens, kw


@functools.partial(jax.jit, static_argnums=0)
def _logits_and_grads(cfg, params, tokens, kw):
    def loss(p):
        logits = Transformer(cfg).apply({"params": p}, tokens, **kw)
        return jnp.mean(jax.nn.log_softmax(logits)[..., :8] ** 2), logits
    return jax.grad(loss, has_aux=True)(params)


# Gemma2-tiny: local and global windows (a traced window per layer), attention soft-cap, query_pre_attn_scalar.
# Scaled RoPE is the rope kernel's own test (test_rope_kernel.py); bench/families.py compares every family.
@pytest.mark.parametrize("name", ["llama-tiny", "bloom-tiny", "glm-tiny", "gemma2-tiny"])
def test_same_logits_and_gradients(name):
    cfg = presets.get(name)
    params = _params(cfg, 0)
    tokens, kw = _batch(cfg)
    grads, logits = _logits_and_grads(cfg, params, tokens, kw)
    p_grads, p_logits = _logits_and_grads(cfg.replace(attention_impl="pallas"), params, tokens, kw)
    # 1e-5 of the logits' scale: Gemma2's embedding scale and post-norms give logits up to its output cap (30).
    np.testing.assert_allclose(p_logits, logits, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(logits)))), rtol=0)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        pg = p_grads
        for key in path:
            pg = pg[key.key]
        # 1e-5 of each leaf's own scale; the key bias has a true gradient of zero (softmax ignores a shift
        # shared by all keys), so its float noise is bounded by the scale of the whole gradient instead.
        atol = 1e-5 * float(jnp.max(jnp.abs(g))) + 1e-6 * scale
        np.testing.assert_allclose(pg, g, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", ["llama-tiny", "gemma2-tiny"])
def test_greedy_generation_same_tokens(name):
    """Prefill through flash attention, then one decode_attention call per token. LLaMA-tiny: GQA, RoPE;
    Gemma2-tiny: a 20-token prompt decodes past its 16-token local window, with soft-capped logits."""
    cfg = presets.get(name)
    params = _params(cfg, 1)
    prompts = [[5, 17, 99, 3], [250, 8, 41, 7, 7, 300, 12, 64, 2], [11]]
    if cfg.sliding_window is not None:
        prompts[1] = prompts[1] + list(range(100, 111))
    want = generate(cfg, params, prompts, 6)
    got = generate(cfg.replace(attention_impl="pallas"), params, prompts, 6)
    assert got == want
    assert [len(row) for row in got] == [6, 6, 6]


def test_pallas_has_the_reference_signatures_and_is_what_the_model_runs():
    def params_of(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
    for name in ("flash_attention", "decode_attention", "rope"):
        assert params_of(getattr(pallas, name)) == params_of(getattr(reference, name)), name
    cfg = presets.get("llama-tiny")
    params, (tokens, kw) = _params(cfg, 0), _batch(cfg)

    def jaxpr(c):
        return str(jax.make_jaxpr(lambda p: Transformer(c).apply({"params": p}, tokens, **kw))(params))
    assert "pallas_call" in jaxpr(cfg.replace(attention_impl="pallas"))
    assert "pallas_call" not in jaxpr(cfg)

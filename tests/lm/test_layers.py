"""Layer-level checks: RoPE vs NumPy, ALiBi slopes vs BLOOM's reference, DeepNorm residual, prefix-LM mask."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import default_positions, presets
from lm.kernels import alibi_slopes
from lm.kernels.reference import attention_mask, rope
from lm.model import MLP, Attention, Block, Transformer
from random_weights import random_params


# ---------------------------------------------------------------- RoPE


def _np_rope(x, pos, theta, interleaved):
    """RoPE as complex rotation of dim pairs by angle pos * theta^(-2i/d); pairs (2i, 2i+1) or (i, i + d/2)."""
    d = x.shape[-1]
    freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    rot = np.exp(1j * pos[:, :, None, None].astype(np.float64) * freq)  # [B, T, 1, d/2]
    if interleaved:
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * rot
        return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
    z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * rot
    return np.concatenate([z.real, z.imag], axis=-1)


def _x_and_positions(d=16, t=6):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, t, 3, d)).astype(np.float32)
    pos = rng.integers(0, 500, size=(2, t)).astype(np.int32)
    return x, pos


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rope_matches_numpy(interleaved, rotary_dim):
    x, pos = _x_and_positions()
    got = np.asarray(rope(jnp.asarray(x), jnp.asarray(pos), theta=10000.0, rotary_dim=rotary_dim,
                          interleaved=interleaved))
    want = np.concatenate([_np_rope(x[..., :rotary_dim], pos, 10000.0, interleaved), x[..., rotary_dim:]], -1)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_rope_hf_rotate_half_form():
    """LLaMA/HF writes RoPE as `x * cos + rotate_half(x) * sin` with frequencies repeated over both halves."""
    x, pos = _x_and_positions()
    d, theta = x.shape[-1], 500.0
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    emb = np.concatenate([pos[..., None] * inv] * 2, axis=-1)[:, :, None]
    rotate_half = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    want = x * np.cos(emb) + rotate_half * np.sin(emb)
    np.testing.assert_allclose(rope(jnp.asarray(x), jnp.asarray(pos), theta=theta), want, atol=2e-5, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    x, _ = _x_and_positions(t=2)
    q, k = jnp.asarray(x[:, :1]), jnp.asarray(x[:, 1:])

    def score(m, n):
        pq = rope(q, jnp.full((2, 1), m)), rope(k, jnp.full((2, 1), n))
        return np.asarray(jnp.sum(pq[0] * pq[1], axis=-1))

    np.testing.assert_allclose(score(7, 3), score(104, 100), atol=1e-4)
    assert np.abs(score(7, 3) - score(7, 5)).max() > 1e-2


def test_rope_2d_glm():
    """ChatGLM-6B: the first half of each head rotates with positions[..., 0], the second with [..., 1]."""
    x, pos = _x_and_positions()
    block = np.random.default_rng(1).integers(0, 20, size=pos.shape).astype(np.int32)
    pos2 = np.stack([pos, block], axis=-1)
    got = np.asarray(rope(jnp.asarray(x), jnp.asarray(pos2), theta=10000.0))
    half = x.shape[-1] // 2
    want = np.concatenate([_np_rope(x[..., :half], pos, 10000.0, False),
                           _np_rope(x[..., half:], block, 10000.0, False)], -1)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_glm_default_positions():
    cfg = presets.get("glm-tiny")
    pos = np.asarray(default_positions(cfg, 1, 6, prefix_len=jnp.asarray([3])))
    np.testing.assert_array_equal(pos[0], [[0, 0], [1, 0], [2, 0], [2, 1], [2, 2], [2, 3]])
    step = np.asarray(default_positions(cfg, 1, 1, offset=jnp.asarray([4]), prefix_len=jnp.asarray([3])))
    np.testing.assert_array_equal(step[0, 0], pos[0, 4])


# ---------------------------------------------------------------- ALiBi


@pytest.mark.parametrize("n_heads", [1, 2, 4, 8, 16, 3, 6, 12, 20, 40, 112])
def test_alibi_slopes_match_bloom(n_heads):
    torch = pytest.importorskip("torch")
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    alibi = build_alibi_tensor(torch.ones(1, 2), n_heads, torch.float32)  # [H, 1, 2]: slope_h * [0, 1]
    np.testing.assert_allclose(np.asarray(alibi_slopes(n_heads)), alibi[:, 0, 1].numpy(), rtol=1e-6)


# ---------------------------------------------------------------- DeepNorm


def _layer_norm(x, p, eps):
    x = np.asarray(x, np.float64)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return ((x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])).astype(np.float32)


def test_deepnorm_block_matches_formula():
    """GLM block: `h = LN(x); x = h * alpha + attn(h); h = LN(x); x = h * alpha + mlp(h)`, alpha = sqrt(2L)."""
    cfg = presets.get("glm-tiny")
    assert cfg.residual == "deepnorm" and cfg.alpha == pytest.approx(math.sqrt(2 * cfg.n_layers))
    assert cfg.replace(deepnorm_alpha=3.0).alpha == 3.0
    lp = jax.tree_util.tree_map(lambda a: a[1], random_params(cfg)["layers"])  # the second block
    b, t = 2, 5
    x = jnp.asarray(np.random.default_rng(2).normal(size=(b, t, cfg.d_model)).astype(np.float32))
    prefix_len = jnp.asarray([3, 5])
    ctx = {"positions": default_positions(cfg, b, t, prefix_len=prefix_len), "prefix_len": prefix_len,
           "segment_ids": None, "decode_index": None}
    got, _ = jax.jit(lambda x: Block(cfg).apply({"params": lp}, x, None, ctx))(x)

    alpha = math.sqrt(2 * cfg.n_layers)
    attn = jax.jit(lambda h: Attention(cfg).apply({"params": lp["attn"]}, h, ctx, None)[0])
    mlp = jax.jit(lambda h: MLP(cfg).apply({"params": lp["mlp"]}, h))
    h = _layer_norm(x, lp["attn_norm"], cfg.norm_eps)
    x1 = h * alpha + np.asarray(attn(h))
    h = _layer_norm(x1, lp["mlp_norm"], cfg.norm_eps)
    want = h * alpha + np.asarray(mlp(h))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- prefix-LM mask


def test_prefix_mask_matches_definition():
    prefix = np.array([0, 3, 6])
    t = 6
    got = np.asarray(attention_mask(jnp.broadcast_to(jnp.arange(t), (3, t)), jnp.arange(t), causal=True,
                                    prefix_len=jnp.asarray(prefix)))[:, 0]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    want = np.stack([(j <= i) | (j < p) for p in prefix])
    np.testing.assert_array_equal(got, want)


def test_prefix_lm_bidirectional_prefix_causal_after():
    """GLM: positions inside the prefix see the whole prefix and nothing after it; later tokens are causal."""
    cfg = presets.get("glm-tiny")
    params = random_params(cfg, seed=3)
    p, t = 4, 9
    base = np.random.default_rng(4).integers(1, cfg.vocab_size, size=t).astype(np.int32)
    after, inside, later = base.copy(), base.copy(), base.copy()
    after[p + 1] = (after[p + 1] + 1) % cfg.vocab_size   # after the prefix
    inside[p - 1] = (inside[p - 1] + 1) % cfg.vocab_size  # last prefix token
    later[p + 3] = (later[p + 3] + 1) % cfg.vocab_size
    tokens = jnp.asarray(np.stack([base, after, inside, later]))
    out = np.asarray(jax.jit(lambda tok: Transformer(cfg).apply({"params": params}, tok,
                                                                prefix_len=jnp.full((4,), p)))(tokens))
    diff = lambda a, b: np.abs(out[a] - out[b]).max(-1)  # noqa: E731  per position
    assert diff(0, 1)[:p + 1].max() < 1e-6 and diff(0, 1)[p + 1:].min() > 1e-4
    assert diff(0, 2).min() > 1e-4  # the prefix is bidirectional: earlier prefix positions see the change
    assert diff(0, 3)[:p + 3].max() < 1e-6 and diff(0, 3)[p + 3:].min() > 1e-4


# ---------------------------------------------------------------- scanned layer stack

@pytest.mark.parametrize("unroll", [0, 2])
def test_unrolled_layer_stack_matches_the_loop(unroll):
    """`scan_unroll` changes only how XLA compiles the stack: logits and gradients equal the rolled loop's."""
    looped = presets.get("llama-tiny", n_layers=3, scan_unroll=1)
    unrolled = presets.get("llama-tiny", n_layers=3, scan_unroll=unroll)
    params = random_params(looped)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, looped.vocab_size, (2, 12)), jnp.int32)

    def loss(p, cfg):
        return jnp.mean(Transformer(cfg).apply({"params": p}, tokens) ** 2)

    want, want_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, looped)
    got, got_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, unrolled)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got_grads, want_grads)

"""Pallas RoPE (interpret mode) against the reference for every convention and scaling kind, and its gradient."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.kernels import pallas, reference

B, T, H, D = 2, 7, 3, 16  # T * H = 21 rows: not a whole tile


def _data(two_d: bool, dtype=jnp.float32):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.standard_normal((B, T, H, D)), dtype)
    pos = np.arange(T)[None] + np.array([[0], [1000]])  # large positions: angles far from zero
    if two_d:
        pos = np.stack([np.minimum(pos, 3), np.maximum(pos - 3, 0)], axis=-1)  # GLM: (prefix pos, span pos)
    return x, jnp.asarray(pos, jnp.int32), jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)


@pytest.mark.parametrize("two_d,interleaved,rotary_dim", [
    (False, False, None),  # LLaMA / HF rotate-half
    (False, True, None),   # GPT-J interleaved
    (False, True, 8),      # GLM-4: interleaved over half the head
    (False, False, 12),    # partial rotate-half, 12 of 16 dims
    (True, False, None),   # ChatGLM-6B 2D positions
])
def test_matches_reference_and_gradient(two_d, interleaved, rotary_dim):
    x, pos, w = _data(two_d)
    kw = dict(theta=500.0, rotary_dim=rotary_dim, interleaved=interleaved)

    @jax.jit
    def both(x):
        kernel = functools.partial(pallas.rope, interpret=True, **kw)
        ref = functools.partial(reference.rope, **kw)
        return [(fn(x, pos), jax.grad(lambda x: jnp.sum(fn(x, pos) * w))(x)) for fn in (kernel, ref)]

    (out, grad), (want, want_grad) = both(x)
    assert float(jnp.max(jnp.abs(out - want))) <= 1e-5
    assert float(jnp.max(jnp.abs(grad - want_grad))) <= 1e-5
    if rotary_dim:  # dims past rotary_dim pass through untouched
        np.testing.assert_array_equal(out[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("scaling", [
    reference.RopeScaling("llama3", 8.0, 32, 1.0, 4.0),  # Llama 3.x: low frequencies slowed, a smooth band
    reference.RopeScaling("linear", 4.0),  # position interpolation
    reference.RopeScaling("yarn", 4.0, 32),  # ramp between interpolation and extrapolation, attention factor
], ids=lambda s: s.kind)
def test_scaled_rope_matches_reference_and_gradient(scaling):
    x, pos, w = _data(False)

    @jax.jit
    def both(x):
        kernel = functools.partial(pallas.rope, interpret=True, scaling=scaling)
        ref = functools.partial(reference.rope, scaling=scaling)
        return [(fn(x, pos), jax.grad(lambda x: jnp.sum(fn(x, pos) * w))(x)) for fn in (kernel, ref)]

    (out, grad), (want, want_grad) = both(x)
    assert float(jnp.max(jnp.abs(out - want))) <= 1e-5
    assert float(jnp.max(jnp.abs(grad - want_grad))) <= 1e-5
    assert float(jnp.max(jnp.abs(out - jax.jit(reference.rope)(x, pos)))) > 0.1  # the scaling changed the angles
    # A rotation keeps each pair's norm; yarn scales cos and sin by 0.1 * ln(factor) + 1.
    gain = 0.1 * np.log(4.0) + 1.0 if scaling.kind == "yarn" else 1.0
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), gain * jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_bfloat16():
    x, pos, _ = _data(False, jnp.bfloat16)
    got = jax.jit(functools.partial(pallas.rope, interpret=True))(x, pos)
    want = jax.jit(reference.rope)(x, pos)
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))) <= 2e-2


def test_bad_inputs_name_the_problem():
    x, pos, _ = _data(False)
    with pytest.raises(ValueError, match="rotary_dim=5"):
        pallas.rope(x, pos, rotary_dim=5, interpret=True)
    with pytest.raises(ValueError, match="positions must be"):
        pallas.rope(x, pos[:, :3], interpret=True)

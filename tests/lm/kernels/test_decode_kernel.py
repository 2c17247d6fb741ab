"""Pallas decode attention (interpret mode) against the reference: GQA, ALiBi, per-row lengths, both layouts,
sliding windows and logit soft-capping."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.kernels import decode, pallas, reference


def _inputs(seed, b, s, hq, hkv, d, dtype=jnp.float32):
    rng = np.random.RandomState(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in
               ((b, hq, d), (b, hkv, s, d), (b, hkv, s, d)))
    return q, k, v


_ref = jax.jit(reference.decode_attention)


def _max_err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


@pytest.mark.parametrize("alibi", [False, True])
def test_gqa_rows_of_different_lengths(alibi):
    # Lengths 1 (a single key), a full cache, and values inside / at the end of a 16-key tile.
    q, k, v = _inputs(0, 4, 64, 4, 2, 16)
    lengths = jnp.array([1, 64, 37, 16], jnp.int32)
    slopes = reference.alibi_slopes(4) if alibi else None
    run = jax.jit(functools.partial(pallas.decode_attention, block_k=16, interpret=True))
    want = _ref(q, k, v, lengths, alibi_slopes=slopes)
    assert _max_err(run(q, k, v, lengths, alibi_slopes=slopes), want) <= 1e-5


def test_tpu_layout_all_heads_per_program_mqa_odd_sizes():
    """The TPU block layout (every K/V head in one program), MQA, a cache length and head dim that need padding."""
    q, k, v = _inputs(1, 2, 50, 6, 1, 20)
    lengths = jnp.array([50, 23], jnp.int32)
    slopes = reference.alibi_slopes(6)
    run = jax.jit(functools.partial(decode.decode_attention, interpret=True, heads_per_program=1))
    want = _ref(q, k, v, lengths, alibi_slopes=slopes)
    assert _max_err(run(q, k, v, lengths, alibi_slopes=slopes), want) <= 1e-5
    q, k, v = _inputs(2, 2, 32, 4, 2, 16)
    run = jax.jit(functools.partial(decode.decode_attention, block_k=16, interpret=True, heads_per_program=2))
    assert _max_err(run(q, k, v, lengths - 18), _ref(q, k, v, lengths - 18)) <= 1e-5


def test_stops_at_each_rows_length_and_bfloat16():
    """Cache tiles past a row's length are never read (NaNs there change nothing); bf16 within 2e-2."""
    q, k, v = _inputs(3, 2, 64, 4, 4, 16, jnp.bfloat16)
    lengths = jnp.array([16, 40], jnp.int32)
    poison = jnp.arange(64)[None, None, :, None] >= jnp.array([16, 48])[:, None, None, None]
    run = jax.jit(functools.partial(pallas.decode_attention, block_k=16, interpret=True))
    got = run(q, jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v), lengths)
    assert _max_err(got, _ref(q, k, v, lengths)) <= 2e-2


@pytest.mark.parametrize("heads_per_program", [1, 2])
def test_window_and_softcap(heads_per_program):
    """Rows shorter than the window (1, 10), longer (37, 64); the window traced as the layer scan passes it;
    q * 8 gives logits a cap of 5 bends. Both program layouts (one or all K/V heads per program)."""
    q, k, v = _inputs(5, 4, 64, 4, 2, 16)
    q = 8 * q
    lengths = jnp.array([1, 64, 37, 10], jnp.int32)
    slopes = reference.alibi_slopes(4)

    @jax.jit
    def both(window):
        kw = dict(alibi_slopes=slopes, window=window, softcap=5.0)
        got = decode.decode_attention(q, k, v, lengths, block_k=16, interpret=True,
                                      heads_per_program=heads_per_program, **kw)
        return got, reference.decode_attention(q, k, v, lengths, **kw)

    got, want = both(jnp.int32(13))
    assert _max_err(got, want) <= 1e-5
    plain = _ref(q, k, v, lengths, alibi_slopes=slopes, window=13)
    assert _max_err(want, plain) > 0.1  # the cap changed the result


def test_skips_cache_tiles_before_the_window():
    """With window 13 the rows of lengths 40 and 64 see keys from 27 and 51 on: tiles of 16 wholly before
    those (NaNs there) are never read."""
    q, k, v = _inputs(6, 2, 64, 4, 2, 16)
    lengths = jnp.array([40, 64], jnp.int32)
    poison = jnp.arange(64)[None, None, :, None] < jnp.array([16, 48])[:, None, None, None]
    run = jax.jit(functools.partial(pallas.decode_attention, window=13, block_k=16, interpret=True))
    got = run(q, jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v), lengths)
    assert _max_err(got, _ref(q, k, v, lengths, window=13)) <= 1e-5


def test_bad_inputs_name_the_problem():
    q, k, v = _inputs(4, 2, 32, 4, 2, 16)
    with pytest.raises(ValueError, match="lengths must be"):
        pallas.decode_attention(q, k, v, jnp.ones((3,), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="dtypes differ"):
        pallas.decode_attention(q, k.astype(jnp.bfloat16), v, jnp.ones((2,), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="window must be a scalar"):
        pallas.decode_attention(q, k, v, jnp.ones((2,), jnp.int32), window=jnp.ones((2,), jnp.int32),
                                interpret=True)

"""Pallas flash attention (interpret mode) against the pure-JAX reference: forward, dQ/dK/dV, block skipping."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm.kernels import flash, pallas, reference


def _inputs(seed, b, t, s, hq, hkv, d, dtype=jnp.float32):
    """q, k, v and an output cotangent w, drawn with NumPy (no device compiles)."""
    rng = np.random.RandomState(seed)
    shapes = ((b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d))
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes)
    return q, k, v, jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)


@functools.partial(jax.jit, static_argnames=("causal", "block_q", "block_k", "grads"))
def _both(q, k, v, w, prefix_len, slopes, segment_ids, *, causal, block_q, block_k, grads):
    """(output, (dq, dk, dv) or None) of the kernel and of the reference; gradients of sum(out * w)."""
    kw = dict(causal=causal, prefix_len=prefix_len, alibi_slopes=slopes, segment_ids=segment_ids)
    kernel = functools.partial(pallas.flash_attention, block_q=block_q, block_k=block_k, interpret=True, **kw)
    ref = functools.partial(reference.flash_attention, **kw)
    results = []
    for fn in (kernel, ref):
        if not grads:
            results.append((fn(q, k, v), None))
            continue
        out, vjp = jax.vjp(fn, q, k, v)
        results.append((out, vjp(w.astype(out.dtype))))
    return results


def _packed_segments(rng, b, t):
    """Sorted segment ids with a padded tail of zeros, as a packing pipeline writes them."""
    ids = np.sort(rng.randint(1, 4, size=(b, t)), axis=1)
    ids[:, t - t // 5:] = 0
    return jnp.asarray(ids, jnp.int32)


def _assert_close(got, want, tol, name):
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
    assert err <= tol, f"{name}: max abs error {err:.3g} > {tol}"


def _check(seed, b, t, s, hq, hkv, d, *, causal, prefix=False, alibi=False, segments=False, block_q=16,
           block_k=16, dtype=jnp.float32, fwd_tol=1e-5, grad_tol=1e-4):
    q, k, v, w = _inputs(seed, b, t, s, hq, hkv, d, dtype)
    rng = np.random.RandomState(seed)
    prefix_len = jnp.asarray(rng.randint(0, t + 1, size=(b,)), jnp.int32) if prefix else None
    slopes = reference.alibi_slopes(hq) if alibi else None
    seg = _packed_segments(rng, b, t) if segments else None
    (out, grads), (ref_out, ref_grads) = _both(q, k, v, w, prefix_len, slopes, seg, causal=causal,
                                               block_q=block_q, block_k=block_k, grads=grad_tol is not None)
    _assert_close(out, ref_out, fwd_tol, "output")
    if grad_tol is not None:
        for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
            _assert_close(g, rg, grad_tol, name)


def test_causal_prefix_alibi_gqa_odd_length():
    # T=40 is not a multiple of either block; bq != bk exercises both the unmasked and the masked loops.
    _check(0, 2, 40, 40, 4, 2, 16, causal=True, prefix=True, alibi=True, block_q=16, block_k=32)


def test_packed_segments_bidirectional_mqa_odd_head_dim():
    _check(1, 2, 40, 40, 4, 1, 12, causal=False, alibi=True, segments=True, block_q=32, block_k=16)


def test_bfloat16_forward():
    _check(3, 2, 40, 40, 4, 2, 16, causal=True, prefix=True, alibi=True, block_q=16, block_k=32,
           dtype=jnp.bfloat16, fwd_tol=2e-2, grad_tol=None)


def test_gpu_blocks_fit_shared_memory():
    # Seen on an H100: f32 at D=128 with 128-row blocks asked Triton for 256 KiB of shared memory (227 KiB
    # there). Off TPU the kernels cut their blocks to `[block, Dp]` tiles of at most 32 KiB.
    cap = flash.gpu_block_cap
    assert (cap(128, 4), cap(256, 4), cap(64, 4), cap(128, 2), cap(256, 2), cap(96, 4)) == (64, 32, 128, 128, 64, 64)


def test_blocks_cut_for_shared_memory_give_the_same_result():
    # f32 at D=128: 128-row blocks are cut to 64 in the forward and the owned side of both backward kernels.
    _check(5, 1, 128, 128, 4, 2, 128, causal=True, prefix=True, alibi=True, block_q=128, block_k=128)
    _check(6, 1, 128, 128, 2, 1, 128, causal=False, segments=True, block_q=128, block_k=128)


def test_fully_masked_blocks_are_skipped():
    """Keys that no query of a block can see are never read: NaNs there leave those queries finite."""
    q, k, v, _ = _inputs(4, 1, 64, 64, 2, 2, 16)
    poison = jnp.arange(64)[None, :, None, None] >= 32
    k_bad, v_bad = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
    run = jax.jit(functools.partial(pallas.flash_attention, block_q=16, block_k=16, interpret=True),
                  static_argnames=("causal",))
    out = run(q, k_bad, v_bad, causal=True)
    _assert_close(out[:, :32], jax.jit(reference.flash_attention)(q, k, v)[:, :32], 1e-5, "causal rows before the NaNs")
    # Two packed sequences of 32: the first never reads the second's blocks.
    seg = jnp.repeat(jnp.array([[1, 2]], jnp.int32), 32, axis=1)
    out = run(q, k_bad, v_bad, segment_ids=seg, causal=False)
    want = jax.jit(reference.flash_attention, static_argnames="causal")(q, k, v, causal=False,
                                                                             segment_ids=seg)
    _assert_close(out[:, :32], want[:, :32], 1e-5, "first packed sequence")


def test_bad_inputs_name_the_problem():
    q, k, v, _ = _inputs(5, 2, 16, 16, 4, 2, 16)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        pallas.flash_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), interpret=True)
    with pytest.raises(ValueError, match="prefix_len"):
        pallas.flash_attention(q, k, v, prefix_len=jnp.zeros((3,), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="block_q=48"):
        pallas.flash_attention(q, k, v, block_q=48, interpret=True)


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_sweep(data):
    """Shapes, odd lengths, GQA ratios, prefix lengths, ALiBi and segment ids drawn at random."""
    draw = data.draw
    hkv = draw(st.sampled_from([1, 2]), "Hkv")
    hq = hkv * draw(st.sampled_from([1, 2, 4]), "group")
    t = draw(st.integers(1, 48), "T")
    segments = draw(st.booleans(), "segments")
    s = t if segments else draw(st.integers(1, 48), "S")
    causal = draw(st.booleans(), "causal")
    _check(draw(st.integers(0, 99), "seed"), draw(st.integers(1, 2), "B"), t, s, hq, hkv,
           draw(st.sampled_from([8, 16, 32]), "D"), causal=causal, prefix=causal and draw(st.booleans(), "prefix"),
           alibi=draw(st.booleans(), "alibi"), segments=segments, block_q=draw(st.sampled_from([16, 32]), "bq"),
           block_k=draw(st.sampled_from([16, 32]), "bk"))

"""Pallas flash attention (interpret mode) against the pure-JAX reference: forward, dQ/dK/dV, block skipping,
sliding windows and logit soft-capping."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm.config import GLOBAL_WINDOW
from lm.kernels import flash, pallas, reference


def _inputs(seed, b, t, s, hq, hkv, d, dtype=jnp.float32):
    """q, k, v and an output cotangent w, drawn with NumPy (no device compiles)."""
    rng = np.random.RandomState(seed)
    shapes = ((b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d))
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes)
    return q, k, v, jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)


@functools.partial(jax.jit, static_argnames=("causal", "block_q", "block_k", "grads", "window", "softcap"))
def _both(q, k, v, w, prefix_len, slopes, segment_ids, traced_window=None, *, causal, block_q, block_k, grads,
          window=None, softcap=None):
    """(output, (dq, dk, dv) or None) of the kernel and of the reference; gradients of sum(out * w).

    The window is a Python int (`window`) or, as the model's layer scan passes it, an int32 `traced_window`."""
    window = window if traced_window is None else traced_window
    kw = dict(causal=causal, prefix_len=prefix_len, alibi_slopes=slopes, segment_ids=segment_ids, window=window,
              softcap=softcap)
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
           block_k=16, dtype=jnp.float32, fwd_tol=1e-5, grad_tol=1e-4, window=None, traced_window=False,
           softcap=None, q_scale=1.0):
    """Kernel against reference; q_scale > 1 gives logits large enough for a soft-cap to bend them."""
    q, k, v, w = _inputs(seed, b, t, s, hq, hkv, d, dtype)
    q = q * q_scale
    rng = np.random.RandomState(seed)
    prefix_len = jnp.asarray(rng.randint(0, t + 1, size=(b,)), jnp.int32) if prefix else None
    slopes = reference.alibi_slopes(hq) if alibi else None
    seg = _packed_segments(rng, b, t) if segments else None
    windows = dict(traced_window=jnp.int32(window)) if traced_window else dict(window=window)
    (out, grads), (ref_out, ref_grads) = _both(q, k, v, w, prefix_len, slopes, seg, causal=causal,
                                               block_q=block_q, block_k=block_k, grads=grad_tol is not None,
                                               softcap=softcap, **windows)
    _assert_close(out, ref_out, fwd_tol, "output")
    if grad_tol is not None:
        for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
            _assert_close(g, rg, grad_tol, name)
    return out, grads


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


def test_sliding_window_gqa_odd_length():
    # T=70: five 16-row blocks, the last one padded; a window of 13 reaches back into the previous block only.
    _check(7, 2, 70, 70, 4, 2, 16, causal=True, window=13)


def test_traced_window_with_alibi_and_unequal_blocks():
    """The model scans over layers and hands each layer's window to the kernel as an int32 scalar."""
    _check(8, 1, 70, 70, 4, 1, 16, causal=True, alibi=True, window=13, traced_window=True, block_q=32,
           block_k=16)


@pytest.mark.parametrize("window", [None, 13])
def test_softcap_with_and_without_window(window):
    # q * 8 gives logits of standard deviation ~8: a cap of 5 bends most of them.
    q, k, v, _ = _inputs(9, 1, 40, 40, 2, 2, 16)
    logits = jnp.einsum("btd,bsd->bts", 8 * q[:, :, 0], k[:, :, 0]) / 4
    assert float(jnp.max(jnp.abs(reference.softcap(logits, 5.0) - logits))) > 5
    _check(9, 2, 40, 40, 4, 2, 16, causal=True, window=window, softcap=5.0, q_scale=8.0, block_k=32)


def test_window_with_packed_segments():
    _check(10, 2, 70, 70, 4, 2, 16, causal=True, segments=True, window=13, block_q=32, block_k=16)


def test_global_window_equals_no_window():
    """Gemma2's global layers pass GLOBAL_WINDOW (2**30): the same results as no window at all."""
    q, k, v, w = _inputs(11, 1, 40, 40, 4, 2, 16)

    @jax.jit
    def both(window):
        results = []
        for win in (window, None):
            fn = functools.partial(pallas.flash_attention, window=win, block_q=16, block_k=16, interpret=True)
            out, vjp = jax.vjp(fn, q, k, v)
            results.append((out, *vjp(w)))
        return results

    for name, got, want in zip(("output", "dq", "dk", "dv"), *both(jnp.int32(GLOBAL_WINDOW))):
        _assert_close(got, want, 1e-6, name)


def test_blocks_outside_the_window_are_skipped():
    """Window 13, blocks of 16: query block [48, 64) starts at key 36, so key blocks [0, 32) are never read
    (NaNs there leave its rows and their dq finite); the dK/dV programs of key blocks [0, 32) reach query row
    43 at most, so NaN queries and cotangents from row 48 on leave their dk, dv finite."""
    q, k, v, w = _inputs(12, 1, 64, 64, 2, 2, 16)
    run = functools.partial(pallas.flash_attention, window=13, block_q=16, block_k=16, interpret=True)
    ref = functools.partial(reference.flash_attention, window=13)

    @functools.partial(jax.jit, static_argnums=0)
    def grads(fn, q, k, v, w):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(w)

    want, (want_dq, want_dk, want_dv) = grads(ref, q, k, v, w)
    early = jnp.arange(64)[None, :, None, None] < 32
    out, (dq, _, _) = grads(run, q, jnp.where(early, jnp.nan, k), jnp.where(early, jnp.nan, v), w)
    _assert_close(out[:, 48:], want[:, 48:], 1e-5, "rows of the last query block")
    _assert_close(dq[:, 48:], want_dq[:, 48:], 1e-4, "dq of the last query block")
    late = jnp.arange(64)[None, :, None, None] >= 48
    _, (_, dk, dv) = grads(run, jnp.where(late, jnp.nan, q), k, v, jnp.where(late, jnp.nan, w))
    _assert_close(dk[:, :32], want_dk[:, :32], 1e-4, "dk of the first key blocks")
    _assert_close(dv[:, :32], want_dv[:, :32], 1e-4, "dv of the first key blocks")


def test_bad_inputs_name_the_problem():
    q, k, v, _ = _inputs(5, 2, 16, 16, 4, 2, 16)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        pallas.flash_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), interpret=True)
    with pytest.raises(ValueError, match="prefix_len"):
        pallas.flash_attention(q, k, v, prefix_len=jnp.zeros((3,), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="block_q=48"):
        pallas.flash_attention(q, k, v, block_q=48, interpret=True)
    with pytest.raises(ValueError, match="window must be a scalar"):
        pallas.flash_attention(q, k, v, window=jnp.ones((2,), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="sliding window with a prefix-LM"):
        pallas.flash_attention(q, k, v, window=4, prefix_len=jnp.zeros((2,), jnp.int32), interpret=True)


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_sweep(data):
    """Shapes, odd lengths, GQA ratios, prefix lengths, ALiBi, segment ids, windows and soft-caps drawn at random."""
    draw = data.draw
    hkv = draw(st.sampled_from([1, 2]), "Hkv")
    hq = hkv * draw(st.sampled_from([1, 2, 4]), "group")
    t = draw(st.integers(1, 48), "T")
    segments = draw(st.booleans(), "segments")
    s = t if segments else draw(st.integers(1, 48), "S")
    causal = draw(st.booleans(), "causal")
    prefix = causal and draw(st.booleans(), "prefix")
    # Windows only where every row keeps a key (S == T) and without a prefix (the kernel refuses both).
    window = None if prefix or s != t else draw(st.one_of(st.none(), st.integers(1, 40)), "window")
    _check(draw(st.integers(0, 99), "seed"), draw(st.integers(1, 2), "B"), t, s, hq, hkv,
           draw(st.sampled_from([8, 16, 32]), "D"), causal=causal, prefix=prefix,
           alibi=draw(st.booleans(), "alibi"), segments=segments, block_q=draw(st.sampled_from([16, 32]), "bq"),
           block_k=draw(st.sampled_from([16, 32]), "bk"), window=window,
           softcap=draw(st.sampled_from([None, 2.0]), "softcap"))

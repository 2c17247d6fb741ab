"""Each kernel (forward and backward) lowers for TPU (Mosaic) and GPU (Triton) without hardware, and on real
hardware the compiled kernels match the reference (skipped on CPU, where the same checks run interpreted)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from lm.kernels import pallas, reference

SDS = jax.ShapeDtypeStruct
B, T, HQ, HKV, D, S = 2, 200, 8, 2, 128, 512  # T=200: padded to whole 128-row blocks
BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32


def _flash_grad(q, k, v, prefix_len, slopes, segment_ids):
    fn = functools.partial(pallas.flash_attention, prefix_len=prefix_len, alibi_slopes=slopes,
                           segment_ids=segment_ids)
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(out)


def _flash_window_grad(q, k, v, window, segment_ids):
    """Mistral/Gemma2 attention: a traced per-layer window and soft-capped logits, on packed rows."""
    fn = functools.partial(pallas.flash_attention, window=window, softcap=50.0, segment_ids=segment_ids)
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(out)


def _decode_window(q, k, v, lengths, window):
    return pallas.decode_attention(q, k, v, lengths, window=window, softcap=50.0)


def _rope_grad(x, positions):
    fn = functools.partial(pallas.rope, rotary_dim=64, interleaved=True)
    out, vjp = jax.vjp(lambda x: fn(x, positions), x)
    return out, vjp(out)


CASES = {
    "flash_fwd_bwd": (_flash_grad, (SDS((B, T, HQ, D), BF16), SDS((B, T, HKV, D), BF16), SDS((B, T, HKV, D), BF16),
                                    SDS((B,), I32), SDS((HQ,), F32), SDS((B, T), I32))),
    "decode": (lambda q, k, v, lengths, slopes: pallas.decode_attention(q, k, v, lengths, alibi_slopes=slopes),
               (SDS((B, HQ, D), BF16), SDS((B, HKV, S, D), BF16), SDS((B, HKV, S, D), BF16), SDS((B,), I32),
                SDS((HQ,), F32))),
    "rope_fwd_bwd": (_rope_grad, (SDS((B, T, HQ, D), BF16), SDS((B, T, 2), I32))),
    "flash_window_softcap_fwd_bwd": (_flash_window_grad, (SDS((B, T, HQ, D), BF16), SDS((B, T, HKV, D), BF16),
                                                          SDS((B, T, HKV, D), BF16), SDS((), I32), SDS((B, T), I32))),
    "decode_window_softcap": (_decode_window, (SDS((B, HQ, D), BF16), SDS((B, HKV, S, D), BF16),
                                               SDS((B, HKV, S, D), BF16), SDS((B,), I32), SDS((), I32))),
}
# Kernel calls per case: fwd, dq, dkv / decode / fwd, bwd.
N_CALLS = {"flash_fwd_bwd": 3, "flash_window_softcap_fwd_bwd": 3, "decode": 1, "decode_window_softcap": 1,
           "rope_fwd_bwd": 2}
# What a compiled (not interpreted) Pallas kernel becomes in each platform's module.
KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lowers_for_device(case, platform):
    fn, args = CASES[case]
    # Triton kernels are not covered by export's compatibility guarantee; lowering them is what we check.
    checks = [export.DisabledSafetyCheck.custom_call(KERNEL_CALL["cuda"])]
    exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
    text = exported.mlir_module()
    assert text.count(f"@{KERNEL_CALL[platform]}(") == N_CALLS[case]


on_device = pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"), reason="needs a GPU or TPU")


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=on_device)])
def test_kernels_match_reference_on_this_backend(interpret):
    """Compiled on GPU/TPU (interpret=False); on CPU only the interpreted run remains."""
    rng = np.random.RandomState(0)
    b, t, s, d = 2, 72, 72, 64
    q, k, v = (jnp.asarray(rng.standard_normal(shape), F32) for shape in
               ((b, t, HQ, d), (b, s, HKV, d), (b, s, HKV, d)))
    prefix_len, slopes = jnp.array([9, 40], I32), reference.alibi_slopes(HQ)
    lengths, positions = jnp.array([72, 31], I32), jnp.broadcast_to(jnp.arange(t, dtype=I32), (b, t))

    def run(impl):
        kw = dict(interpret=interpret) if impl is pallas else {}
        loss = lambda q, k, v: jnp.sum(impl.flash_attention(q, k, v, prefix_len=prefix_len, alibi_slopes=slopes,
                                                            **kw) ** 2)  # noqa: E731
        return (jax.grad(loss, (0, 1, 2))(q, k, v), impl.rope(q, positions, **kw),
                impl.decode_attention(q[:, 0], k.swapaxes(1, 2), v.swapaxes(1, 2), lengths, alibi_slopes=slopes, **kw))

    with jax.default_matmul_precision("highest"):
        got, want = jax.jit(lambda: run(pallas))(), jax.jit(lambda: run(reference))()
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, atol=2e-3 * (1 + float(jnp.max(jnp.abs(w)))), rtol=0)

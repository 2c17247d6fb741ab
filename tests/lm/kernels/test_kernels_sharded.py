"""The kernels under a (2, 2, 2) ("data", "fsdp", "tensor") mesh of 8 fake CPU devices equal one device."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lm.kernels import pallas, reference

B, T, HQ, HKV, D = 4, 24, 4, 2, 16


def _mesh():
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 fake CPU devices"
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:8])


def _inputs():
    rng = np.random.RandomState(0)
    arrays = [rng.standard_normal(s) for s in ((B, T, HQ, D), (B, T, HKV, D), (B, T, HKV, D), (B, T, HQ, D))]
    return [jnp.asarray(a, jnp.float32) for a in arrays]


def _all(q, k, v, w, prefix_len, positions, lengths, window):
    """Flash forward + dq/dk/dv, RoPE, decode: every kernel once; then flash forward and decode again with a
    sliding window (a replicated int32 scalar) and soft-capped logits."""
    slopes = reference.alibi_slopes(HQ)
    flash = functools.partial(pallas.flash_attention, prefix_len=prefix_len, alibi_slopes=slopes, block_q=16,
                              block_k=16)
    out, vjp = jax.vjp(flash, q, k, v)
    rot = pallas.rope(q, positions)
    kc, vc = k.swapaxes(1, 2), v.swapaxes(1, 2)  # decode caches are [B, Hkv, S, D]
    dec = pallas.decode_attention(q[:, 0], kc, vc, lengths, alibi_slopes=slopes, block_k=16)
    local = pallas.flash_attention(q, k, v, window=window, softcap=2.0, block_q=16, block_k=16)
    local_dec = pallas.decode_attention(q[:, 0], kc, vc, lengths, window=window, softcap=2.0, block_k=16)
    return out, vjp(w), rot, dec, local, local_dec


def test_sharded_kernels_match_one_device():
    q, k, v, w = _inputs()
    prefix_len = jnp.array([3, 0, 11, 24], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) + 7
    lengths = jnp.array([1, 24, 9, 16], jnp.int32)
    window = jnp.int32(5)
    args = (q, k, v, w, prefix_len, positions, lengths, window)
    want = jax.jit(_all)(*args)

    mesh = _mesh()
    with jax.set_mesh(mesh):
        heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
        rows = NamedSharding(mesh, P(("data", "fsdp")))
        placed = [jax.device_put(x, heads) for x in (q, k, v, w)]
        placed += [jax.device_put(prefix_len, rows), jax.device_put(positions, rows), jax.device_put(lengths, rows),
                   window]
        sharded = jax.jit(_all)
        hlo = sharded.lower(*placed).as_text()
        got = sharded(*placed)
    # The kernels ran inside shard_map, split over batch (data, fsdp) and heads (tensor).
    assert '<@mesh, [{"data", "fsdp"}, {}, {"tensor"}, {}]>' in re.findall(r"sdy.manual_computation.*", hlo)[0]
    assert got[0].sharding.spec == P(("data", "fsdp"), None, "tensor", None)
    for g, x in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, x, atol=1e-5, rtol=0)

"""Causal bf16 attention: the Pallas flash kernel against `jax.nn.dot_product_attention` (XLA and cuDNN).

    python -m bench.attention                 # GPU/TPU: TFLOP/s table; CPU: correctness only
    python -m bench.attention --seqs 1024,4096 --head-dims 128

On a GPU it prints, per head dim and sequence length, the TFLOP/s of the forward and of forward+backward
for the Pallas kernel, `implementation="xla"` and `implementation="cudnn"`, and Pallas as a ratio of each.
On CPU, Pallas runs in interpret mode, which says nothing about speed: the script then only checks the
kernel against the XLA path on small shapes and says so.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from lm.kernels import pallas


def _attention(impl: str):
    """`(q, k, v) -> out` for "pallas", "xla" or "cudnn", all causal, `[B, T, H, D]` in and out."""
    if impl == "pallas":
        return functools.partial(pallas.flash_attention, causal=True)
    return functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=impl)


def _step(impl: str, backward: bool):
    attend = _attention(impl)
    if not backward:
        return jax.jit(attend)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _inputs(batch: int, seq: int, heads: int, head_dim: int, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(key, (batch, seq, heads, head_dim), dtype) for key in keys]


def _seconds(fn, args, repeats: int) -> float:
    """Median wall time of one call, after a compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _max_error(a, b) -> float:
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in leaves)


def check_correctness(seq: int = 96, heads: int = 4, head_dim: int = 64) -> None:
    """Pallas vs the XLA path, forward and gradients, on small causal bf16 inputs (any backend)."""
    args = _inputs(2, seq, heads, head_dim)
    for backward in (False, True):
        err = _max_error(_step("pallas", backward)(*args), _step("xla", backward)(*args))
        what = "fwd+bwd (dq, dk, dv)" if backward else "fwd"
        print(f"  {what:22s} seq={seq} D={head_dim}: max |pallas - xla| = {err:.3g}")
        if err > 5e-2:
            raise SystemExit(f"Pallas flash attention disagrees with XLA ({what}): max error {err:.3g}")


def benchmark(seqs, head_dims, tokens: int, width: int, repeats: int) -> None:
    """Print TFLOP/s and ratios; each config keeps batch * seq = tokens and heads * head_dim = width."""
    impls = ["pallas", "xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
    print(f"device: {jax.devices()[0].device_kind}; causal bf16, {tokens} tokens per batch, width {width}")
    tflops = "".join(f"{name:>10s}" for name in impls)
    ratios = "".join(f"{'pallas/' + name:>14s}" for name in impls[1:])
    print(f"{'':20s}{'TFLOP/s':>{10 * len(impls)}s}{'ratio':>{14 * (len(impls) - 1)}s}")
    print(f"{'pass':8s}{'D':>5s}{'seq':>7s}{tflops}{ratios}")
    for head_dim in head_dims:
        for seq in seqs:
            batch, heads = max(1, tokens // seq), width // head_dim
            args = _inputs(batch, seq, heads, head_dim)
            fwd_flops = 4 * batch * heads * seq * seq * head_dim / 2  # two matmuls, half the scores (causal)
            for backward, flops in ((False, fwd_flops), (True, 3.5 * fwd_flops)):  # backward: 2.5x forward
                rates = {}
                for impl in impls:
                    try:
                        rates[impl] = flops / _seconds(_step(impl, backward), args, repeats) / 1e12
                    except Exception as err:  # e.g. cuDNN without a supported kernel for this shape
                        print(f"  {impl} failed at D={head_dim} seq={seq}: {type(err).__name__}: {err}"[:300])
                        rates[impl] = float("nan")
                cells = "".join(f"{rates[name]:10.1f}" for name in impls)
                ratio = "".join(f"{rates['pallas'] / rates[name]:14.2f}" for name in impls[1:])
                print(f"{'fwd+bwd' if backward else 'fwd':8s}{head_dim:5d}{seq:7d}{cells}{ratio}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", default="1024,2048,4096,8192", help="comma-separated sequence lengths")
    parser.add_argument("--head-dims", default="64,128", help="comma-separated head dims")
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seq of each config")
    parser.add_argument("--width", type=int, default=2048, help="heads * head_dim of each config")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    if backend == "cpu":
        print("CPU backend: Pallas runs in interpret mode, which measures nothing about kernel speed.")
        print("Checking correctness only (run on a GPU for the TFLOP/s table):")
        check_correctness()
        print("OK")
        return
    print(f"{backend} backend: correctness first")
    check_correctness()
    benchmark([int(s) for s in args.seqs.split(",")], [int(d) for d in args.head_dims.split(",")], args.tokens,
              args.width, args.repeats)


if __name__ == "__main__":
    main()

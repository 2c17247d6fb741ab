"""What the Pallas kernels share: target dispatch (interpret / TPU / GPU), block-size and padding rules.

A kernel module writes one `build(target)` returning a function of arrays; `dispatch` turns it into a single
function that picks the branch for the platform the computation is lowered for (`lax.platform_dependent`),
so `jax.export(..., platforms=["tpu"])` on a CPU host lowers the real TPU kernel. Targets:
  "interpret": `pallas_call(interpret=True)`, the only mode that runs on CPU;
  "tpu": Mosaic TPU, per-row scalars in SMEM, blocks whose last two dims are (8, 128)-aligned or full;
  "gpu": Triton (`pltriton.CompilerParams`), every loaded tile a power of two with matmul dims >= 16;
  "cpu": a compiled kernel asked for on CPU, which Pallas refuses at lowering with a clear message.
The kernels use one array layout that satisfies all three, so the CPU tests run the code the devices run.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

TARGETS = ("interpret", "tpu", "gpu", "cpu")
# Masked logits sit below the running-max floor, so exp(masked - max) is exactly 0 even in a row that has
# seen no visible key yet; fully masked rows then end with l == 0 and get a zero output.
MAX_INIT = -1e30
MASKED = -2e30
# lse of a fully masked row: large, so exp(s - lse) is 0 in the backward pass.
LSE_EMPTY = 1e30
MIN_TILE = 16  # Triton's tl.dot needs every matmul dim >= 16


def dispatch(build: Callable[[str], Callable], *args, interpret: Optional[bool]):
    """Run `build(target)(*args)`, the target chosen by `interpret` and the lowering platform.

    interpret=True: interpret mode everywhere; False: compiled (TPU or GPU; no CPU kernel exists);
    None: interpret mode on CPU, compiled on TPU/GPU.
    """
    if interpret:
        return build("interpret")(*args)
    default = build("interpret" if interpret is None else "cpu")
    gpu = build("gpu")
    return jax.lax.platform_dependent(*args, tpu=build("tpu"), cuda=gpu, rocm=gpu, default=default)


def scalar_spec(target: str) -> pl.BlockSpec:
    """Whole small array (per-row lengths, per-head slopes) read with scalar indexing; SMEM on TPU."""
    if target == "tpu":
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec()


def compiler_params(target: str, semantics: Sequence[str], num_warps: int = 4, num_stages: int = 2):
    """Backend parameters; their type is what selects Mosaic TPU or Triton at lowering."""
    if target == "tpu":
        return pltpu.CompilerParams(dimension_semantics=tuple(semantics))
    if target == "gpu":
        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return None


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def tile(n: int, block: int, name: str) -> int:
    """Block size for a dim of size `n`: `block` (a power of two >= 16) or less when `n` is smaller."""
    if not is_pow2(block) or block < MIN_TILE:
        raise ValueError(f"{name}={block} must be a power of two >= {MIN_TILE} (Triton tiles; TPU sublanes)")
    return min(block, max(MIN_TILE, pl.next_power_of_2(n)))


def padded_dim(d: int) -> int:
    """Head dim as the kernels see it: a power of two >= 16 (zero padding leaves dot products unchanged)."""
    return max(MIN_TILE, pl.next_power_of_2(d))


def pad_axis(x, axis: int, size: int, value=0):
    """Pad `x` with `value` along `axis` up to `size` (no-op when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


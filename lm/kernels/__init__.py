"""Attention and RoPE behind one switch: `impl="xla"` runs the pure-JAX reference, `impl="pallas"` the kernels.

Model code calls these three functions and never knows which implementation ran.
"""
from __future__ import annotations

import importlib

from lm.kernels import reference
from lm.kernels.reference import alibi_slopes

_IMPLS = {"xla": reference}


def register(name: str, module) -> None:
    """Make `module` (with flash_attention, decode_attention, rope) selectable as `impl=name`."""
    _IMPLS[name] = module


def _impl(name: str):
    if name not in _IMPLS:
        if name == "pallas":
            importlib.import_module("lm.kernels.pallas")  # registers itself
        else:
            raise ValueError(f"unknown attention_impl {name!r}; known: {sorted(_IMPLS) + ['pallas']}")
    return _IMPLS[name]


def flash_attention(q, k, v, *, impl: str = "xla", **kw):
    """Full-sequence attention (see `reference.flash_attention` for the arguments)."""
    return _impl(impl).flash_attention(q, k, v, **kw)


def decode_attention(q, k_cache, v_cache, lengths, *, impl: str = "xla", **kw):
    """Single-token attention against a KV cache (see `reference.decode_attention`)."""
    return _impl(impl).decode_attention(q, k_cache, v_cache, lengths, **kw)


def rope(x, positions, *, impl: str = "xla", **kw):
    """Rotary position embedding (see `reference.rope`)."""
    return _impl(impl).rope(x, positions, **kw)


__all__ = ["alibi_slopes", "decode_attention", "flash_attention", "register", "rope", "reference"]

"""Gemma layouts."""
from __future__ import annotations

ARCHS = []

"""Differentiable ops: :func:`multihead_ce` and its backends."""
from .multihead_ce import NonFiniteError, available_backends, multihead_ce, multihead_ce_reference

__all__ = ["multihead_ce", "multihead_ce_reference", "available_backends", "NonFiniteError"]

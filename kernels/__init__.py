"""Triton kernel sources, installed as ``fastmtl.kernels``.

Importing works without triton; ``fastmtl.kernels.multihead_ce.HAS_TRITON`` says whether
the kernels can run.
"""

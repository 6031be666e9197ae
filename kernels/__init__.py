"""Triton kernel sources, installed as ``fastmtl.kernels``; importing needs triton."""

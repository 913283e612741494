"""Triton kernels, installed as ``pytrain.triton``; use them through ``pytrain.kernels``."""

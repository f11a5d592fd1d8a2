"""Fused ops. One sub-package per op: its pure-PyTorch reference, its kernels and its dispatch."""

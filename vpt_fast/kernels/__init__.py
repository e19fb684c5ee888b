"""Triton kernels, one per file with its host launcher."""

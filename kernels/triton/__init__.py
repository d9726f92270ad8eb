"""Triton kernels. Each op sits beside its torch reference in tsvmerge.primitives."""

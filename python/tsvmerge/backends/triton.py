"""Triton backend: the torch range finder, with fused Triton kernels for every pass over the task matrices.

fp64 tensors (and CPU tensors outside the Triton interpreter) go to the torch hooks.
"""
from __future__ import annotations

import torch

# Without triton these imports raise ImportError, which the registry and CudaBackend expect.
from tsvmerge.kernels.triton import delta_sketch as _delta
from tsvmerge.kernels.triton import gram as _gram
from tsvmerge.kernels.triton import lowrank_apply as _lowrank

from ..options import Option, boolean
from .randomized import TorchBackend


class TritonBackend(TorchBackend):
    name = "triton"
    # TF32 dots use tensor cores (~7x the fp32 FMA peak on H100); they agree to ~3e-4, ieee to ~1e-6.
    OPTIONS = TorchBackend.OPTIONS + (Option("tf32", boolean, False, "TF32 tensor-core products (agree to ~3e-4)"),)

    def __init__(self, device="cuda", compute_dtype=torch.float32, seed=0, **options):
        super().__init__(device, compute_dtype, seed, **options)
        self.input_precision = "tf32" if self.options["tf32"] else "ieee"

    @staticmethod
    def is_available() -> bool:
        return torch.cuda.is_available()  # triton itself was imported with this module

    def _runs(self, *tensors) -> bool:
        """Whether the kernels take these tensors (else the torch hook runs); None is an absent base."""
        return self.compute_dtype == torch.float32 and all(
            t is None or (t.dtype in _delta.SUPPORTED_DTYPES and (t.is_cuda or _delta.INTERPRET)) for t in tensors)

    # The sketch draws Omega from Triton's Philox stream, not torch's generator: another Omega,
    # the same distribution, deterministic for a seed.
    def sketch(self, finetuned, base, c, transposed=False):
        if transposed or not self._runs(finetuned, base):
            return super().sketch(finetuned, base, c, transposed)
        return _delta.delta_sketch(finetuned, base, c, self.seed, input_precision=self.input_precision)

    def delta_matmul(self, finetuned, base, x):
        if not self._runs(finetuned, base, x):
            return super().delta_matmul(finetuned, base, x)
        return _delta.delta_matmul(finetuned, base, x, input_precision=self.input_precision)

    def delta_matmul_t(self, finetuned, base, y):
        if not self._runs(finetuned, base, y):
            return super().delta_matmul_t(finetuned, base, y)
        return _delta.delta_matmul_t(finetuned, base, y, input_precision=self.input_precision)

    def gram(self, x, task_block=None):
        """x^T x; task_block=k when x is concatenated orthonormal k-column panels (diagonal blocks are I)."""
        if not self._runs(x):
            return super().gram(x)
        return _gram.gram(x, task_block=task_block, input_precision=self.input_precision)

    def lowrank_apply(self, base, u, s, v, alpha, out_dtype):
        if not self._runs(base, u, s, v) or out_dtype not in _lowrank.SUPPORTED_DTYPES:
            return super().lowrank_apply(base, u, s, v, alpha, out_dtype)
        return _lowrank.lowrank_apply(base, u, s, v, alpha, out_dtype, input_precision=self.input_precision)

"""Triton backend: the torch range finder, with fused Triton kernels for every pass over the task matrices.

An input a kernel does not take (a dtype it has no variant for; a CPU tensor outside the Triton
interpreter) goes to the torch hook, and `describe()["fallbacks"]` counts it.
"""
from __future__ import annotations

import torch

# Without triton these imports raise ImportError, which the registry and CudaBackend expect.
from tsvmerge.kernels.triton import delta_sketch as _delta
from tsvmerge.kernels.triton import gram as _gram
from tsvmerge.kernels.triton import lowrank_apply as _lowrank

from ..options import Option, boolean
from .torch_backend import TorchBackend


def why_declined(tensors, dtypes) -> str | None:
    """Why a kernel taking `dtypes` on CUDA (or in the interpreter) cannot take `tensors`
    (None: an absent base), or None when it can."""
    for t in tensors:
        if t is None:
            continue
        if not (t.is_cuda or _delta.INTERPRET):
            return f"device {t.device.type}"
        if t.dtype not in dtypes:
            return f"dtype {str(t.dtype).replace('torch.', '')}"
    return None


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

    def describe(self) -> dict:
        return {**super().describe(), "fallbacks": self.fallback_report()}

    def _kernel_takes(self, primitive, *tensors, dtypes=_delta.SUPPORTED_DTYPES) -> bool:
        why = why_declined(tensors, dtypes)
        if why is not None:
            self.declined(primitive, why)
        return why is None

    # The sketch draws Omega from Triton's Philox stream, not torch's generator: another Omega,
    # the same distribution, deterministic for a seed.
    def sketch(self, finetuned, base, c, transposed=False):
        if not self._kernel_takes("sketch", finetuned, base):
            return super().sketch(finetuned, base, c, transposed)
        return _delta.delta_sketch(finetuned, base, c, self.seed, transposed=transposed,
                                   input_precision=self.input_precision)

    def delta_matmul(self, finetuned, base, x):
        if not self._kernel_takes("delta_matmul", finetuned, base, x):
            return super().delta_matmul(finetuned, base, x)
        return _delta.delta_matmul(finetuned, base, x, input_precision=self.input_precision)

    def delta_matmul_t(self, finetuned, base, y):
        if not self._kernel_takes("delta_matmul_t", finetuned, base, y):
            return super().delta_matmul_t(finetuned, base, y)
        return _delta.delta_matmul_t(finetuned, base, y, input_precision=self.input_precision)

    def gram(self, x):
        if not self._kernel_takes("gram", x, dtypes=_gram.SUPPORTED_DTYPES):
            return super().gram(x)
        return _gram.gram(x, input_precision=self.input_precision)

    def lowrank_apply(self, base, u, s, v, alpha, out_dtype):
        why = why_declined((base, u, s, v), _lowrank.SUPPORTED_DTYPES)
        if why is None and out_dtype not in _lowrank.SUPPORTED_DTYPES:
            why = f"out_dtype {str(out_dtype).replace('torch.', '')}"
        if why is not None:
            self.declined("lowrank_apply", why)
            return super().lowrank_apply(base, u, s, v, alpha, out_dtype)
        return _lowrank.lowrank_apply(base, u, s, v, alpha, out_dtype, input_precision=self.input_precision)

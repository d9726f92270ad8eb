"""CUDA backend: the Triton backend (or the torch one where Triton is missing) with the small
dense steps on the CUDA kernels of `tsvmerge.cuda_ops`: batched Jacobi eigh (sizes <= 128)
and Cholesky-QR2 with a shifted retry."""
from __future__ import annotations

from collections import Counter

import torch

from .. import cuda_ops

try:
    from .triton import TritonBackend as _Base
except ImportError:  # no Triton backend module, or triton itself is not installed
    from .randomized import TorchBackend as _Base


class CudaBackend(_Base):
    name = "cuda"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.qr_routes = Counter()  # route name -> matrices orthonormalized that way

    @staticmethod
    def is_available() -> bool:
        return cuda_ops.available()

    @staticmethod
    def _fits(x: torch.Tensor, size: int) -> bool:
        return x.is_cuda and x.dtype == torch.float32 and size <= cuda_ops.MAX_SIZE

    def sym_eigh(self, a):
        if not self._fits(a, a.shape[-1]):
            return super().sym_eigh(a)
        return cuda_ops.batched_eigh(a)

    def orthonormalize(self, y, passes=2):
        m, c = y.shape[-2:]
        if not self._fits(y, c) or m < c:
            return super().orthonormalize(y, passes)
        q, route = cuda_ops.cholesky_qr2(y)
        counts = torch.bincount(route.flatten(), minlength=len(cuda_ops.ROUTE_NAMES)).tolist()
        self.qr_routes.update({name: n for name, n in zip(cuda_ops.ROUTE_NAMES, counts) if n})
        return q

    def describe(self) -> dict:
        return {**super().describe(), "base": _Base.name, "qr_routes": dict(self.qr_routes)}

"""CUDA backend: the Triton backend (or the torch one where Triton is missing) with the small
dense steps on the CUDA kernels of `tsvmerge.cuda_ops`: batched Jacobi eigh (fp32 and fp64,
n <= 128) and Cholesky-QR with a shifted retry (fp32, c <= 128).

What a merge asks of sym_eigh, all fp64 on CUDA (measured on one block of each zoo; k = r / T,
sketch width c = k + 10): every range-finder basis (c x c), the energy estimate (4 x 4) and the
polar Grams of the small tensors run on the kernel; the Krylov small SVD (2c x 2c) runs on it
where 2c <= 128; the polar Grams of the layers (Tk x Tk) do not.
- ViT-B-32 x 8: kernel for 106, 74, 48, 32, 16, 4; torch for the Krylov SVDs 212 and 148 and
  the Grams 768 and 512.
- ViT-L-14 x 20: kernel for 122, 96, 61, 48, 44, 22, 4; torch for the Grams 1020, 760, 240.
The rest run in torch (cuSOLVER), and `describe()["fallbacks"]` counts them.
"""
from __future__ import annotations

from collections import Counter

import torch

from .. import cuda_ops

try:
    from .triton import TritonBackend as _Base
except ImportError:  # no Triton backend module, or triton itself is not installed
    from .torch_backend import TorchBackend as _Base


def _why_eigh_declined(a: torch.Tensor) -> str | None:
    n = a.shape[-1]
    if not a.is_cuda:
        return f"device {a.device.type}"
    if a.dtype not in cuda_ops.EIGH_DTYPES:
        return f"dtype {str(a.dtype).replace('torch.', '')}"
    if n > cuda_ops.native().EIGH_MAX_N:
        return f"n {n} > {cuda_ops.native().EIGH_MAX_N}"
    smem = cuda_ops.eigh_launch(n, a.dtype, a.device)[1]
    if smem > cuda_ops.max_smem(a.device):  # fp64 on GPUs with less shared memory than Hopper
        return f"n {n} needs {smem} bytes of shared memory"
    return None


def _why_qr_declined(y: torch.Tensor) -> str | None:
    m, c = y.shape[-2:]
    if not y.is_cuda:
        return f"device {y.device.type}"
    if y.dtype != torch.float32:
        return f"dtype {str(y.dtype).replace('torch.', '')}"
    if c > cuda_ops.native().CHOLQR_MAX_C:
        return f"c {c} > {cuda_ops.native().CHOLQR_MAX_C}"
    if m < c:
        return f"m {m} < c {c}"
    return None


class CudaBackend(_Base):
    name = "cuda"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.qr_routes = Counter()  # route name -> matrices orthonormalized that way

    @staticmethod
    def is_available() -> bool:
        return cuda_ops.available()

    def sym_eigh(self, a):
        why = _why_eigh_declined(a)
        if why is not None:
            self.declined("sym_eigh", why)
            return super().sym_eigh(a)
        return cuda_ops.batched_eigh(a)

    def orthonormalize(self, y, passes=2):
        why = _why_qr_declined(y)
        if why is not None:
            self.declined("orthonormalize", why)
            return super().orthonormalize(y, passes)
        q, route = cuda_ops.cholesky_qr(y, passes)
        counts = torch.bincount(route.flatten(), minlength=len(cuda_ops.ROUTE_NAMES)).tolist()
        self.qr_routes.update({name: n for name, n in zip(cuda_ops.ROUTE_NAMES, counts) if n})
        return q

    def describe(self) -> dict:
        return {**super().describe(), "base": _Base.name, "qr_routes": dict(self.qr_routes),
                "fallbacks": self.fallback_report()}

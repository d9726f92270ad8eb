"""CUDA kernels of the cuda backend: batched Jacobi eigh and Cholesky-QR2 with a shifted retry.

The kernels live in `kernels/cuda/*.cuh` (installed as `tsvmerge/kernels/cuda`). A build with
CUDA launches them from `tsvmerge._C`; a build without it falls back to CuPy, which compiles
the same sources at run time (NVRTC). Either way tensors cross as device pointers and the
kernels run on torch's current stream.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

MAX_SIZE = 128  # largest n for batched_eigh and c for cholesky_qr2 (TSV_EIGH_MAX_N, TSV_CHOLQR_MAX_C)

# Route codes of cholesky_qr2, per matrix (TSV_CHOL_* in cholesky_qr.cuh, plus the fallback).
ROUTE_CHOLQR2, ROUTE_SHIFTED_CHOLQR3, ROUTE_HOUSEHOLDER = 0, 1, 2
ROUTE_NAMES = ("cholqr2", "shifted_cholqr3", "householder")

_DEFAULT_SMEM = 48 * 1024  # above this a kernel must opt in to more dynamic shared memory


def kernel_dir() -> Path:
    """Folder holding the .cuh kernel sources."""
    import tsvmerge.kernels

    return Path(tsvmerge.kernels.__file__).parent / "cuda"


def compiled_with_cuda() -> bool:
    """Whether tsvmerge._C was built with the CUDA kernels."""
    try:
        from tsvmerge import _C
    except ImportError:
        return False
    return bool(_C.build_info()["cuda"])


def cupy_importable() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:  # a broken CUDA install raises more than ImportError
        return False
    return True


def available() -> bool:
    """A CUDA device and a way to launch the kernels (the compiled module or CuPy)."""
    return torch.cuda.is_available() and (compiled_with_cuda() or cupy_importable())


# -- launch geometry: the same numbers as csrc/cuda_ops.cu ------------------------------------
def eigh_launch(n: int) -> tuple[int, int]:
    """(threads, dynamic shared bytes) of tsv_jacobi_eigh_f32 for n x n matrices."""
    big_n = n + n % 2
    pairs = big_n // 2
    threads = min(256, 32 * -(-pairs * pairs // 32))
    return threads, 8 * (threads + 1 + pairs) + 4 * (4 * pairs + big_n + 2 * big_n * (big_n + 1))


def cholesky_launch(c: int) -> tuple[int, int]:
    """(threads, dynamic shared bytes) of tsv_cholesky_f32 for c x c Gram matrices."""
    threads = 32 * -(-c // 32)
    return threads, 8 * (threads + c + 2) + 4 * c * (c + 1)


def trsm_launch(c: int) -> tuple[int, int]:
    """(rows per block = threads, dynamic shared bytes) of tsv_trsm_lower_t_f32."""
    rows = 128
    return rows, 4 * (c * (c + 1) + c * (rows + 1))


NVRTC_HEADERS = ("common.cuh", "jacobi_eigh.cuh", "cholesky_qr.cuh")  # dependencies first


def nvrtc_source() -> str:
    """What CuPy compiles: the headers' text itself, not #include lines, because CuPy keys its
    on-disk cache by the source text; an edited or upgraded kernel is then never served stale."""
    return "\n".join((kernel_dir() / name).read_text() for name in NVRTC_HEADERS)


def nvrtc_options() -> tuple[str, ...]:
    return ("-std=c++17", f"-I{kernel_dir()}")


class _Ptr(int):
    """A device address, to tell pointers from int32 scalars when packing kernel arguments."""


class _StreamHandle:
    """A raw cudaStream_t in the CUDA stream protocol, for cupy.cuda.Stream.from_external."""

    def __init__(self, handle: int):
        self._handle = handle

    def __cuda_stream__(self):
        return (0, self._handle)


class _NvrtcOps:
    """The entry points of tsvmerge._C, compiled at run time by CuPy (NVRTC)."""

    def __init__(self):
        import cupy

        self._cupy = cupy
        self._module = cupy.RawModule(code=nvrtc_source(), options=nvrtc_options())

    def _launch(self, name, grid, threads, smem, stream, *args):
        cupy = self._cupy
        with cupy.cuda.Device(torch.cuda.current_device()):
            kernel = self._module.get_function(name)
            if smem > _DEFAULT_SMEM:
                kernel.max_dynamic_shared_size_bytes = smem
            # Pointers go as uint64 by value: the kernel parameters are 8-byte pointers.
            packed = [np.uint64(a) if isinstance(a, _Ptr) else np.int32(a) for a in args]
            with cupy.cuda.Stream.from_external(_StreamHandle(stream)):
                kernel(grid, (threads,), tuple(packed), shared_mem=smem)

    def jacobi_eigh(self, a, w, v, batch, n, stream):
        threads, smem = eigh_launch(n)
        self._launch("tsv_jacobi_eigh_f32", (batch,), threads, smem, stream, _Ptr(a), _Ptr(w), _Ptr(v), n)

    def cholesky(self, g, l, status, batch, c, allow_shift, stream):
        threads, smem = cholesky_launch(c)
        self._launch("tsv_cholesky_f32", (batch,), threads, smem, stream,
                     _Ptr(g), _Ptr(l), _Ptr(status), c, int(allow_shift))

    def trsm_lower_t(self, y, l, q, batch, m, c, stream):
        rows, smem = trsm_launch(c)
        self._launch("tsv_trsm_lower_t_f32", (batch, -(-m // rows)), rows, smem, stream,
                     _Ptr(y), _Ptr(l), _Ptr(q), m, c)


@functools.lru_cache(maxsize=None)
def _ops():
    if compiled_with_cuda():
        from tsvmerge import _C

        return _C
    return _NvrtcOps()


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _check_input(t: torch.Tensor, name: str, what: str):
    if not t.is_cuda:
        raise ValueError(f"{what}: {name} must be a CUDA tensor, got device {t.device}")
    if t.dtype != torch.float32:
        raise ValueError(f"{what}: {name} must be float32, got {t.dtype}")


def batched_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of symmetric a [..., n, n] (n <= 128; lower triangle read), like torch.linalg.eigh:
    eigenvalues ascending [..., n], eigenvectors as columns [..., n, n]."""
    _check_input(a, "a", "batched_eigh")
    n = a.shape[-1]
    if a.dim() < 2 or a.shape[-2] != n or not 1 <= n <= MAX_SIZE:
        raise ValueError(f"batched_eigh: a must be [..., n, n] with 1 <= n <= {MAX_SIZE}, got {tuple(a.shape)}")
    a = a.contiguous()
    w = torch.empty(a.shape[:-1], device=a.device, dtype=a.dtype)
    v = torch.empty_like(a)
    batch = a.numel() // (n * n)
    if batch:
        with torch.cuda.device(a.device):
            _ops().jacobi_eigh(a.data_ptr(), w.data_ptr(), v.data_ptr(), batch, n, _stream())
    return w, v


def _cholqr_pass(y: torch.Tensor, allow_shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One (optionally shifted) Cholesky-QR pass over y [batch, m, c] -> (q, status int32 [batch])."""
    batch, m, c = y.shape
    # The Gram in fp64, rounded once to fp32: a TF32 matmul setting cannot touch it (TF32 would
    # leave it ~1e-3 off), and H100/H200 run DGEMM on their tensor cores.
    y64 = y.double()
    gram = (y64.transpose(1, 2) @ y64).float()
    low = torch.empty_like(gram)
    status = torch.empty(batch, device=y.device, dtype=torch.int32)
    q = torch.empty_like(y)
    ops, stream = _ops(), _stream()
    ops.cholesky(gram.data_ptr(), low.data_ptr(), status.data_ptr(), batch, c, allow_shift, stream)
    ops.trsm_lower_t(y.data_ptr(), low.data_ptr(), q.data_ptr(), batch, m, c, stream)
    return q, status


def cholesky_qr2(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the columns of tall-skinny y [..., m, c] (c <= 128, m >= c).

    Returns (q [..., m, c], route int32 [...]): per matrix ROUTE_CHOLQR2 (two Cholesky-QR
    passes), ROUTE_SHIFTED_CHOLQR3 (the Gram matrix was too ill-conditioned: one shifted pass,
    then two plain ones) or ROUTE_HOUSEHOLDER (even that failed, e.g. rank-deficient y:
    torch.linalg.qr).
    """
    _check_input(y, "y", "cholesky_qr2")
    if y.dim() < 2:
        raise ValueError(f"cholesky_qr2: y must be [..., m, c], got {tuple(y.shape)}")
    m, c = y.shape[-2:]
    if not 1 <= c <= MAX_SIZE or m < c:
        raise ValueError(f"cholesky_qr2: y must be [..., m, c] with 1 <= c <= {MAX_SIZE} and m >= c, "
                         f"got {tuple(y.shape)}")
    panels = y.reshape(-1, m, c).contiguous()
    if panels.shape[0] == 0:
        return torch.empty_like(y), torch.empty(y.shape[:-2], device=y.device, dtype=torch.int32)
    with torch.cuda.device(y.device):
        q, route = _cholqr_pass(panels, allow_shift=True)
        q, status = _cholqr_pass(q, allow_shift=False)
        route = torch.maximum(route, status)
        shifted = (route == ROUTE_SHIFTED_CHOLQR3).nonzero().squeeze(1)
        if shifted.numel():
            q[shifted], status = _cholqr_pass(q[shifted], allow_shift=False)
            route[shifted] = torch.maximum(route[shifted], status)
        failed = (route == ROUTE_HOUSEHOLDER).nonzero().squeeze(1)
        if failed.numel():
            q[failed] = torch.linalg.qr(panels[failed])[0]
    return q.reshape(y.shape), route.reshape(y.shape[:-2])

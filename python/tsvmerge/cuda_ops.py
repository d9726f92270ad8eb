"""CUDA kernels of the cuda backend: batched Jacobi eigh (fp32, fp64) and Cholesky-QR with a
shifted retry.

The kernels live in `kernels/cuda/*.cuh` (`tsvmerge.kernels`). A build with CUDA launches them
from `tsvmerge._C`; a build without it falls back to CuPy, which compiles the same sources at
run time (NVRTC). Either way tensors cross as device pointers, the kernels run on torch's
current stream, and the launch geometry is `csrc/launch_geometry.h`'s, read through
`tsvmerge._C` (which every build has).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

# Route codes of cholesky_qr, per matrix (TSV_CHOL_* in cholesky_qr.cuh, plus the fallback).
ROUTE_CHOLESKY, ROUTE_SHIFTED, ROUTE_HOUSEHOLDER = 0, 1, 2
ROUTE_NAMES = ("cholesky_qr", "shifted_cholesky_qr", "householder")
EIGH_DTYPES = (torch.float32, torch.float64)

_DEFAULT_SMEM = 48 * 1024  # above this a kernel must opt in to more dynamic shared memory


def kernel_dir() -> Path:
    """Folder holding the .cuh kernel sources."""
    import tsvmerge.kernels

    return Path(tsvmerge.kernels.__file__).parent / "cuda"


def native():
    """tsvmerge._C: the launch geometry in every build, the compiled launchers in a CUDA build."""
    from tsvmerge import _C

    return _C


def compiled_with_cuda() -> bool:
    """Whether tsvmerge._C was built with the CUDA kernels."""
    try:
        return bool(native().build_info()["cuda"])
    except ImportError:
        return False


def cupy_importable() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:  # a broken CUDA install raises more than ImportError
        return False
    return True


def available() -> bool:
    """A CUDA device and a way to launch the kernels (the compiled module or CuPy)."""
    return torch.cuda.is_available() and (compiled_with_cuda() or cupy_importable())


def max_smem(device: torch.device) -> int:
    """Dynamic shared memory a block of `device` may opt in to."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def eigh_launch(n: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """(threads, shared bytes, global scratch elements per matrix) of jacobi_eigh on `device`."""
    return native().eigh_launch(n, torch.empty(0, dtype=dtype).element_size(), max_smem(device))


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
    """The entry points of tsvmerge._C, compiled at run time by CuPy (NVRTC), launched with
    tsvmerge._C's geometry."""

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

    def jacobi_eigh(self, a, w, v, v_scratch, batch, n, fp64, stream):
        threads, smem, scratch = native().eigh_launch(n, 8 if fp64 else 4, max_smem(torch.cuda.current_device()))
        self._launch("tsv_jacobi_eigh_f64" if fp64 else "tsv_jacobi_eigh_f32", (batch,), threads, smem, stream,
                     _Ptr(a), _Ptr(w), _Ptr(v), _Ptr(v_scratch if scratch else 0), n)

    def cholesky(self, g, l, status, batch, c, allow_shift, stream):
        threads, smem, _ = native().cholesky_launch(c)
        self._launch("tsv_cholesky_f32", (batch,), threads, smem, stream,
                     _Ptr(g), _Ptr(l), _Ptr(status), c, int(allow_shift))

    def trsm_lower_t(self, y, l, q, batch, m, c, stream):
        rows, smem, _ = native().trsm_launch(c)
        self._launch("tsv_trsm_lower_t_f32", (batch, -(-m // rows)), rows, smem, stream,
                     _Ptr(y), _Ptr(l), _Ptr(q), m, c)


@functools.lru_cache(maxsize=None)
def _ops():
    return native() if compiled_with_cuda() else _NvrtcOps()


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _check_input(t: torch.Tensor, name: str, what: str, dtypes=(torch.float32,)):
    if not t.is_cuda:
        raise ValueError(f"{what}: {name} must be a CUDA tensor, got device {t.device}")
    if t.dtype not in dtypes:
        raise ValueError(f"{what}: {name} must be {' or '.join(str(d)[6:] for d in dtypes)}, got {t.dtype}")


def batched_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of symmetric a [..., n, n] (fp32 or fp64, n <= 128; lower triangle read), like
    torch.linalg.eigh: eigenvalues ascending [..., n], eigenvectors as columns [..., n, n]."""
    _check_input(a, "a", "batched_eigh", EIGH_DTYPES)
    n = a.shape[-1]
    if a.dim() < 2 or a.shape[-2] != n or not 1 <= n <= native().EIGH_MAX_N:
        raise ValueError(f"batched_eigh: a must be [..., n, n] with 1 <= n <= {native().EIGH_MAX_N}, "
                         f"got {tuple(a.shape)}")
    with torch.cuda.device(a.device):
        return run_eigh(a, _ops(), max_smem(a.device), _stream())


def run_eigh(a, ops, smem_limit: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """batched_eigh's host side, on any tensors whose pointers the launcher `ops` takes (the
    emulation tests pass CPU tensors and the emulated kernels)."""
    n = a.shape[-1]
    a = a.contiguous()
    w = torch.empty(a.shape[:-1], device=a.device, dtype=a.dtype)
    v = torch.empty_like(a)
    batch = a.numel() // (n * n)
    if batch:
        scratch = native().eigh_launch(n, a.element_size(), smem_limit)[2]
        v_scratch = torch.empty(batch * scratch, device=a.device, dtype=a.dtype) if scratch else None
        ops.jacobi_eigh(a.data_ptr(), w.data_ptr(), v.data_ptr(), 0 if v_scratch is None else v_scratch.data_ptr(),
                        batch, n, a.dtype == torch.float64, stream)
    return w, v


def cholesky_qr(y: torch.Tensor, passes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the columns of tall-skinny fp32 y [..., m, c] (c <= 128, m >= c), as
    `primitives.orthonormalize`: `passes` Cholesky-QR passes (two reach orthogonality to working
    precision; one leaves a well-conditioned basis).

    Returns (q [..., m, c], route int32 [...]): per matrix ROUTE_CHOLESKY (plain passes),
    ROUTE_SHIFTED (the Gram was too ill-conditioned: the first pass is shifted and one more
    pass follows) or ROUTE_HOUSEHOLDER (even that failed, e.g. rank-deficient y:
    torch.linalg.qr).
    """
    _check_input(y, "y", "cholesky_qr")
    if y.dim() < 2:
        raise ValueError(f"cholesky_qr: y must be [..., m, c], got {tuple(y.shape)}")
    m, c = y.shape[-2:]
    if not 1 <= c <= native().CHOLQR_MAX_C or m < c or passes < 1:
        raise ValueError(f"cholesky_qr: y must be [..., m, c] with 1 <= c <= {native().CHOLQR_MAX_C} and m >= c, "
                         f"and passes >= 1, got {tuple(y.shape)} and passes={passes}")
    with torch.cuda.device(y.device):
        return run_cholesky_qr(y, passes, _ops(), _stream())


def run_cholesky_qr(y, passes: int, ops, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cholesky_qr's host side, on any tensors whose pointers the launcher `ops` takes."""
    m, c = y.shape[-2:]
    panels = y.reshape(-1, m, c).contiguous()
    if panels.shape[0] == 0:
        return torch.empty_like(y), torch.empty(y.shape[:-2], device=y.device, dtype=torch.int32)
    q, route = _cholqr_pass(panels, True, ops, stream)
    for _ in range(passes - 1):
        q, status = _cholqr_pass(q, False, ops, stream)
        route = torch.maximum(route, status)
    shifted = (route == ROUTE_SHIFTED).nonzero().squeeze(1)
    if shifted.numel():
        q[shifted], status = _cholqr_pass(q[shifted], False, ops, stream)
        route[shifted] = torch.maximum(route[shifted], status)
    failed = (route == ROUTE_HOUSEHOLDER).nonzero().squeeze(1)
    if failed.numel():
        q[failed] = torch.linalg.qr(panels[failed])[0]
    return q.reshape(y.shape), route.reshape(y.shape[:-2])


def _cholqr_pass(y: torch.Tensor, allow_shift: bool, ops, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One (optionally shifted) Cholesky-QR pass over y [batch, m, c] -> (q, status int32 [batch])."""
    batch, m, c = y.shape
    # The Gram in fp64, rounded once to fp32: a TF32 matmul setting cannot touch it (TF32 would
    # leave it ~1e-3 off), and H100/H200 run DGEMM on their tensor cores.
    y64 = y.double()
    gram = (y64.transpose(1, 2) @ y64).float()
    low = torch.empty_like(gram)
    status = torch.empty(batch, device=y.device, dtype=torch.int32)
    q = torch.empty_like(y)
    ops.cholesky(gram.data_ptr(), low.data_ptr(), status.data_ptr(), batch, c, allow_shift, stream)
    ops.trsm_lower_t(y.data_ptr(), low.data_ptr(), q.data_ptr(), batch, m, c, stream)
    return q, status

"""CPU scheduling of the small dense LAPACK calls (eigh, Cholesky) the backends make.

The math is `tsvmerge.primitives`; this module only decides on which threads, and through
which LAPACK, it runs. On CUDA tensors everything passes straight through.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools

import numpy as np
import torch

# Matrices at least this wide are worth LAPACK's own threads; `sym_eigh` splits batches of
# at least this much work (matrices x width^3) over threads of its own (768^2: 0.1 s each).
THREADED_LAPACK_MIN = 128
THREADED_EIGH_WORK = 2 * 128 ** 3
_eigh_pool = None


@contextlib.contextmanager
def serial_lapack(*tensors: torch.Tensor):
    """Run batched LAPACK calls on small CPU matrices on one thread.

    torch parallelises such calls per matrix, and an OpenMP fork/join per small matrix
    costs more than the work whenever the other core is busy (measured on 2 cores under
    load: eigh of 12 x 768^2 in fp64, 1.5 s on one thread, 30 s on two). `sym_eigh` gets
    the cores back for wide matrices by splitting the batch over Python threads instead.
    """
    if any(t.is_cuda for t in tensors):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def serially(fn):
    """fn with its LAPACK calls on one thread (`serial_lapack` over its tensor arguments)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with serial_lapack(*(a for a in args if isinstance(a, torch.Tensor))):
            return fn(*args, **kwargs)
    return run


@functools.cache
def _numpy_openblas():
    """A limiter for numpy's OpenBLAS threads, or None when numpy uses another LAPACK (or
    threadpoolctl is missing: an install with --no-deps, as on the offline GPU machine)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    controller = ThreadpoolController().select(internal_api="openblas")
    return controller if controller.lib_controllers else None


def _eigh_on_this_thread(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 through numpy's LAPACK where that is OpenBLAS: its dsyevd is 1.2x faster than
    torch's (MKL) at 768^2 (0.087 vs 0.107 s) and 1020^2 (0.162 vs 0.199 s) on the CI's
    AMD EPYC; in fp32 torch's is faster (0.049 vs 0.080 s at 768^2)."""
    if a.dtype == torch.float64 and _numpy_openblas() is not None:
        w, v = np.linalg.eigh(a.numpy())
        return torch.from_numpy(w), torch.from_numpy(v)
    return torch.linalg.eigh(a)


def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    global _eigh_pool
    if _eigh_pool is None:  # torch's thread count is per thread: one each in the pool
        _eigh_pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="tsvmerge-eigh",
                                                           initializer=torch.set_num_threads, initargs=(1,))
    return _eigh_pool


def _split_over_threads(a: torch.Tensor) -> bool:
    flat_batch = a.numel() // (a.shape[-1] * a.shape[-2])
    return not a.is_cuda and torch.get_num_threads() >= 2 and flat_batch >= 2 and \
        flat_batch * a.shape[-1] ** 3 >= THREADED_EIGH_WORK


def sym_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`primitives.sym_eigh`, scheduled: on CPU each thread runs single-threaded LAPACK on
    its share of the batch. As fast as threaded LAPACK on a quiet machine (768^2 fp64 on 2
    cores: 0.050 s vs 0.052 s per matrix, 0.095 s on one thread) and, with no fork/join
    barrier, it degrades gently when another process holds a core.
    """
    if not _split_over_threads(a):
        with serial_lapack(a):
            return torch.linalg.eigh(a)
    threads = torch.get_num_threads()
    flat = a.reshape(-1, *a.shape[-2:])
    openblas = _numpy_openblas()
    with openblas.limit(limits=1) if openblas is not None else contextlib.nullcontext():
        parts = list(_pool(threads).map(_eigh_on_this_thread, flat.tensor_split(threads)))
    w = torch.cat([p[0] for p in parts]).reshape(a.shape[:-1])
    return w, torch.cat([p[1] for p in parts]).reshape(a.shape)


def sym_eigvalsh(a: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of symmetric a [..., n, n], ascending, scheduled as `sym_eigh`."""
    if not _split_over_threads(a):
        with serial_lapack(a):
            return torch.linalg.eigvalsh(a)
    threads = torch.get_num_threads()
    flat = a.reshape(-1, *a.shape[-2:])
    return torch.cat(list(_pool(threads).map(torch.linalg.eigvalsh, flat.tensor_split(threads)))).reshape(a.shape[:-1])

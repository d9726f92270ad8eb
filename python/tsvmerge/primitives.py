"""Engine primitives in plain torch.

Each function here is the reference for a fast version (Triton in `tsvmerge.kernels.triton`,
CUDA in `tsvmerge.kernels.cuda`); the tests compare the two on random inputs. Shapes are
batched: `L` layers of one shape group, `T` tasks, matrices `m x n`.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools

import numpy as np
import torch

# The paper's clamp for the whitening route: 1 / (sqrt(|lambda|) + eps).
WHITEN_EPS = 1e-12


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: fp64 stays fp64, everything else computes in fp32."""
    return x if x.dtype == torch.float64 else x.float()


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


def _tau(finetuned: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    if base is None:  # the caller already holds task vectors
        return upcast(finetuned)
    return upcast(finetuned) - upcast(base).unsqueeze(1)


def delta_matmul(finetuned: torch.Tensor, base: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """(theta_i - theta_0) @ x for every layer and task.

    finetuned [L, T, m, n], base [L, m, n] or None (finetuned holds tau already),
    x [L, T, n, c] -> [L, T, m, c] (fp32 accumulate).
    """
    tau = _tau(finetuned, base)
    # As (x^T tau^T)^T: the big operand on the right runs ~1.2x faster in CPU BLAS.
    return (x.to(tau.dtype).transpose(-1, -2) @ tau.transpose(-1, -2)).transpose(-1, -2)


def delta_matmul_t(finetuned: torch.Tensor, base: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """(theta_i - theta_0)^T @ y: finetuned [L, T, m, n], y [L, T, m, c] -> [L, T, n, c]."""
    tau = _tau(finetuned, base)
    # As (y^T tau)^T: ~1.4x faster than tau^T y in CPU BLAS (measured, m x n = 3072 x 1024, c = 61).
    return (y.to(tau.dtype).transpose(-1, -2) @ tau).transpose(-1, -2)


def gaussian_sketch(n: int, c: int, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Seeded standard-normal test matrix Omega [n, c], shared by every matrix of a batch."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(n, c, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x for a batch of panels x [..., m, K] -> [..., K, K] (fp32 accumulate)."""
    x = upcast(x)
    return x.transpose(-1, -2) @ x


def gram_sym(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """x^T x from its block upper triangle, `block` columns at a time: about half the flops
    of `gram` (torch has no syrk). For the fp64 Grams of long concatenated factors
    (4096 x 1020 fp64 on 2 cores: 0.19 s as one GEMM; blocks of 51, 0.22 s; of 128, 0.11 s)."""
    x = upcast(x)
    K = x.shape[-1]
    g = x.new_empty(*x.shape[:-2], K, K)
    for i in range(0, K, block):
        row = x[..., i:i + block].transpose(-1, -2) @ x[..., i:]
        g[..., i:i + block, i:] = row
        g[..., i + block:, i:i + block] = row[..., block:].transpose(-1, -2)
    return g


def inv_sqrt_psd(g: torch.Tensor, eps: float = WHITEN_EPS, range_only: bool = False,
                 eigh=None, data_dtype: torch.dtype | None = None,
                 out_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """g^(-1/2) for symmetric PSD g [..., K, K]: eigh in fp64, the result in `out_dtype`
    (assembled in it: a caller that casts the result anyway saves an fp64 K^3 product).

    Default: the paper's clamp 1/(sqrt(|lambda|) + eps). With range_only, eigenvalues at
    the rounding level count as zero (the pseudo-inverse root): x g^(-1/2) with g = x^T x
    is then the polar factor of x restricted to its range, as `polar` gives. The level is
    that of g's dtype, or of x's (`data_dtype`, squared) when g was accumulated in fp64
    from lower-precision x: exact duplicate columns then give lambda ~ 1e-16, not 0.
    """
    w, q = (eigh or sym_eigh)(g.double())
    if range_only:
        if data_dtype is None or data_dtype == torch.float64:
            rel = g.shape[-1] ** 0.5 * torch.finfo(g.dtype).eps
        else:
            rel = g.shape[-1] * torch.finfo(data_dtype).eps ** 2
        tol = w[..., -1:].clamp_min(0) * rel
        scale = torch.where(w > tol, w.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(w))
    else:
        scale = 1.0 / (w.abs().sqrt() + eps)
    q = q.to(out_dtype)
    return (q * scale.to(out_dtype).unsqueeze(-2)) @ q.transpose(-1, -2)


# `polar_root` takes the fp32 route where the Gram's condition number is below this: it
# then leaves a relative error <= 2e-5 in the polar factor (measured at 3072 x 768 and
# 768 x 768), against ~eps32 sqrt(cond) for the fp64 route.
FP32_GRAM_COND = 1e3


def polar_root(x: torch.Tensor, g: torch.Tensor, eigh=None) -> torch.Tensor:
    """(x^T x)^(-1/2) on x's range, so that x @ root is x's polar factor: x [B, m, K],
    g = x^T x [B, K, K] -> [B, K, K] in x's dtype.

    An fp64 g takes the fp64 route (`inv_sqrt_psd`). An fp32 g is eigendecomposed in fp32
    (twice as fast) where it is well conditioned: where its Cholesky pivots do not already
    show cond(g) > FP32_GRAM_COND, and then its fp32 eigenvalues confirm it. The rest get
    an fp64 Gram and eigh: tasks that share directions make cond(g) reach 1e8, where an
    fp32 Gram has lost the small eigenvalues entirely.
    """
    eigh = eigh or sym_eigh
    if g.dtype == torch.float64:
        return inv_sqrt_psd(g, range_only=True, eigh=eigh, data_dtype=x.dtype, out_dtype=x.dtype)
    with serial_lapack(g) if g.shape[-1] < THREADED_LAPACK_MIN else contextlib.nullcontext():
        low, info = torch.linalg.cholesky_ex(g)
    pivots = low.diagonal(dim1=-2, dim2=-1) ** 2
    fast = (info == 0) & (pivots.amin(-1) * FP32_GRAM_COND > pivots.amax(-1))
    root = torch.empty(g.shape, dtype=x.dtype, device=x.device)
    if bool(fast.any()):
        idx = fast.nonzero().squeeze(-1)
        w, q = eigh(g[idx])
        ok = w[..., 0] * FP32_GRAM_COND > w[..., -1]
        root[idx[ok]] = ((q * w.clamp_min(torch.finfo(w.dtype).tiny).rsqrt().unsqueeze(-2)) @ q.mT)[ok].to(x.dtype)
        fast[idx[~ok]] = False
    if not bool(fast.all()):
        slow = (~fast).nonzero().squeeze(-1)
        root[slow] = inv_sqrt_psd(gram_sym(x[slow].double()), range_only=True, eigh=eigh,
                                  data_dtype=x.dtype, out_dtype=x.dtype)
    return root


def polar(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor P Q^T of x = P S Q^T (the orthogonal Procrustes solution).

    Where x is exactly rank-deficient (duplicate or collinear tasks) the factor is not
    unique: the null directions of P and Q are arbitrary and would add arbitrary rank-one
    terms to the merge. We keep only the directions with S above rounding level (the
    partial isometry on x's range, which the whitening route also gives); for full-rank x
    nothing changes.
    """
    p, s, qh = torch.linalg.svd(x, full_matrices=False)
    tol = s[..., :1] * (max(x.shape[-2:]) * torch.finfo(s.dtype).eps)
    return (p * (s > tol).to(p.dtype).unsqueeze(-2)) @ qh


def whiten(x: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """x (x^T x)^(-1/2): equals polar(x) when x has full column rank."""
    return x @ inv_sqrt_psd(gram(x), eps, out_dtype=x.dtype)


def orthonormalize(y: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """Orthonormal basis of the columns of tall-skinny y [..., m, c] (Cholesky-QR2).

    Two Cholesky-QR passes give orthogonality to working precision when cond(y) is below
    about 1/sqrt(eps); one pass leaves an error of about eps cond(y)^2, which is enough for
    the intermediate bases of a power iteration. The small c x c steps run in fp64 and R^-1 is applied as a matmul.
    Matrices whose Gram is not positive definite fall back to Householder QR.
    """
    q = y
    for _ in range(passes):
        g = gram(q).double()
        with serial_lapack(g):
            low, info = torch.linalg.cholesky_ex(g)
            eye = torch.eye(low.shape[-1], dtype=low.dtype, device=low.device).expand_as(low)
            r_inv = torch.linalg.solve_triangular(low.transpose(-1, -2), eye, upper=True)
        q = q @ r_inv.to(q.dtype)
        failed = info != 0
        if bool(failed.any()):      # the others still get their next pass
            q[failed] = torch.linalg.qr(y[failed])[0]
    return q


def range_basis(y: torch.Tensor, floor: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal columns for the directions of y [..., m, c] above rounding level and zero
    columns for the rest: y W diag(lambda^-1/2) from the eigenpairs of y^T y. Unlike QR it
    stays batched and finite when y is rank-deficient (converged Krylov blocks).

    `floor` [...] is the absolute eigenvalue below which a direction counts as zero; by
    default it is relative to y's own largest one, which is wrong when y is all rounding
    noise (a block projected against a basis that already spans it): pass the scale y had
    before the projection then.
    """
    g = gram(y).double()
    w, q = sym_eigh(g)
    tol = w[..., -1:].clamp_min(0) * (g.shape[-1] ** 0.5 * torch.finfo(y.dtype).eps)
    if floor is not None:
        tol = torch.maximum(tol, floor.double().unsqueeze(-1))
    scale = torch.where(w > tol, w.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(w))
    return y @ (q * scale.unsqueeze(-2)).to(y.dtype)


# Matrices at least this wide are worth LAPACK's own threads; `sym_eigh` splits batches of
# at least this much work (matrices x width^3) over threads of its own (768^2: 0.1 s each).
THREADED_LAPACK_MIN = 128
THREADED_EIGH_WORK = 2 * 128 ** 3
_eigh_pool = None


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


def sym_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of symmetric a [..., c, c], eigenvalues ascending (torch's convention).

    On CPU each thread runs single-threaded LAPACK on its share of the batch: as fast as
    threaded LAPACK on a quiet machine (768^2 fp64 on 2 cores: 0.050 s vs 0.052 s per
    matrix, 0.095 s on one thread) and, with no fork/join barrier, it degrades gently when
    another process holds a core.
    """
    global _eigh_pool
    threads = torch.get_num_threads()
    flat = a.reshape(-1, *a.shape[-2:])
    if a.is_cuda or threads < 2 or flat.shape[0] < 2 or flat.shape[0] * a.shape[-1] ** 3 < THREADED_EIGH_WORK:
        with serial_lapack(a):
            return torch.linalg.eigh(a)
    if _eigh_pool is None:  # torch's thread count is per thread: one each in the pool
        _eigh_pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="tsvmerge-eigh",
                                                           initializer=torch.set_num_threads, initargs=(1,))
    openblas = _numpy_openblas()
    with openblas.limit(limits=1) if openblas is not None else contextlib.nullcontext():
        parts = list(_eigh_pool.map(_eigh_on_this_thread, flat.tensor_split(threads)))
    w = torch.cat([p[0] for p in parts]).reshape(a.shape[:-1])
    return w, torch.cat([p[1] for p in parts]).reshape(a.shape)


def lowrank_apply(base: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                  alpha: float, out_dtype: torch.dtype) -> torch.Tensor:
    """cast(theta_0 + alpha * U diag(s) V^T): base [L, m, n], u [L, m, K], s [L, K], v [L, n, K]."""
    us = (upcast(u) * upcast(s).unsqueeze(-2)).reshape(-1, *u.shape[-2:])
    out = torch.baddbmm(upcast(base).reshape(-1, *base.shape[-2:]), us, upcast(v).reshape(-1, *v.shape[-2:]).mT, alpha=alpha)
    return out.reshape(base.shape).to(out_dtype)


def lowrank_product(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """u diag(s) v^T for u [..., m, k], s [..., k], v [..., n, k] (fp32 accumulate)."""
    return (upcast(u) * upcast(s).unsqueeze(-2)) @ upcast(v).mT

"""Engine primitives in plain torch: the reference of every step a backend may speed up.

The fast versions are tested against these on random inputs: the Triton kernels
(`tsvmerge.kernels.triton`, tests/test_triton_kernels.py), the CUDA kernels
(`tsvmerge.kernels.cuda`, tests/test_cuda_kernels.py, on CPU through an emulation harness) and
the torch backend's own routes (`tsvmerge.backends.fast_polar` and `.lapack`,
tests/test_fast_paths.py). Shapes are batched: `L` layers of one shape group, `T` tasks,
matrices `m x n`. A small dense step that a backend schedules or replaces (eigh, the Cholesky
inverse) is a parameter.
"""
from __future__ import annotations

import hashlib

import torch

# The paper's clamp for the whitening route: 1 / (sqrt(|lambda|) + eps).
WHITEN_EPS = 1e-12


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: fp64 stays fp64, everything else computes in fp32."""
    return x if x.dtype == torch.float64 else x.float()


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


def named_generator(seed: int, name: str, role: str) -> torch.Generator:
    """A CPU generator seeded by a stable hash of (seed, tensor name, role): draws that depend
    on what a tensor is, never on batch order or process (`hash()` is salted per process)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{role}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x for a batch of panels x [..., m, K] -> [..., K, K] (fp32 accumulate)."""
    x = upcast(x)
    return x.transpose(-1, -2) @ x


def sym_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of symmetric a [..., c, c] (lower triangle read), eigenvalues ascending."""
    return torch.linalg.eigh(a)


def inv_sqrt_psd(g: torch.Tensor, eps: float = WHITEN_EPS, range_only: bool = False,
                 eigh=sym_eigh, data_dtype: torch.dtype | None = None,
                 out_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """g^(-1/2) for symmetric PSD g [..., K, K]: eigh in fp64, the result in `out_dtype`
    (assembled in it: a caller that casts the result anyway saves an fp64 K^3 product).

    Default: the paper's clamp 1/(sqrt(|lambda|) + eps). With range_only, eigenvalues at
    the rounding level count as zero (the pseudo-inverse root): x g^(-1/2) with g = x^T x
    is then the polar factor of x restricted to its range, as `polar` gives. The level is
    that of g's dtype, or of x's (`data_dtype`, squared) when g was accumulated in fp64
    from lower-precision x: exact duplicate columns then give lambda ~ 1e-16, not 0.
    """
    w, q = eigh(g.double())
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


def whiten(x: torch.Tensor, g: torch.Tensor | None = None, eigh=sym_eigh) -> torch.Tensor:
    """x (x^T x)^(-1/2) with the paper's clamp (g = x^T x where the caller has it): equals
    polar(x) when x has full column rank."""
    return x @ inv_sqrt_psd(gram(x) if g is None else g, eigh=eigh, out_dtype=x.dtype)


def cholesky_r_inv(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R^-1, info) for g = R^T R [..., c, c] (upper R from the Cholesky factor); info != 0
    where g is not positive definite."""
    low, info = torch.linalg.cholesky_ex(g)
    eye = torch.eye(low.shape[-1], dtype=low.dtype, device=low.device).expand_as(low)
    return torch.linalg.solve_triangular(low.transpose(-1, -2), eye, upper=True), info


def orthonormalize(y: torch.Tensor, passes: int = 2, r_inv=cholesky_r_inv) -> torch.Tensor:
    """Orthonormal basis of the columns of tall-skinny y [..., m, c] (Cholesky-QR2).

    Two Cholesky-QR passes give orthogonality to working precision when cond(y) is below
    about 1/sqrt(eps); one pass leaves an error of about eps cond(y)^2, which is enough for
    the intermediate bases of a power iteration. The small c x c steps (`r_inv`) run in
    fp64 and R^-1 is applied as a matmul. Matrices whose Gram is not positive definite fall
    back to Householder QR.
    """
    q = y
    for _ in range(passes):
        r, info = r_inv(gram(q).double())
        q = q @ r.to(q.dtype)
        failed = info != 0
        if bool(failed.any()):      # the others still get their next pass
            q[failed] = torch.linalg.qr(y[failed])[0]
    return q


def range_basis(y: torch.Tensor, floor: torch.Tensor | None = None, eigh=sym_eigh) -> torch.Tensor:
    """Orthonormal columns for the directions of y [..., m, c] above rounding level and zero
    columns for the rest: y W diag(lambda^-1/2) from the eigenpairs of y^T y. Unlike QR it
    stays batched and finite when y is rank-deficient (converged Krylov blocks).

    `floor` [...] is the absolute eigenvalue below which a direction counts as zero; by
    default it is relative to y's own largest one, which is wrong when y is all rounding
    noise (a block projected against a basis that already spans it): pass the scale y had
    before the projection then.
    """
    g = gram(y).double()
    w, q = eigh(g)
    tol = w[..., -1:].clamp_min(0) * (g.shape[-1] ** 0.5 * torch.finfo(y.dtype).eps)
    if floor is not None:
        tol = torch.maximum(tol, floor.double().unsqueeze(-1))
    scale = torch.where(w > tol, w.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(w))
    return y @ (q * scale.unsqueeze(-2)).to(y.dtype)


def lowrank_apply(base: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                  alpha: float, out_dtype: torch.dtype) -> torch.Tensor:
    """cast(theta_0 + alpha * U diag(s) V^T): base [L, m, n], u [L, m, K], s [L, K], v [L, n, K].

    On the CPU one matrix at a time, each copied to fresh memory: MKL rounds a GEMM differently
    by its operands' alignment (seen in fp64 on AVX-512 at 37 x 23), and a tensor must come out
    the same in any batch (`apply` makes one tensor at a time what `merge` made in a batch)."""
    us = (upcast(u) * upcast(s).unsqueeze(-2)).reshape(-1, *u.shape[-2:])
    b, v = upcast(base).reshape(-1, *base.shape[-2:]), upcast(v).reshape(-1, *v.shape[-2:])
    if b.is_cuda:
        out = torch.baddbmm(b, us, v.mT, alpha=alpha)
    else:
        out = torch.cat([torch.baddbmm(b[i:i + 1].clone(), us[i:i + 1].clone(), v[i:i + 1].clone().mT, alpha=alpha)
                         for i in range(b.shape[0])])
    return out.reshape(base.shape).to(out_dtype)


def lowrank_product(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """u diag(s) v^T for u [..., m, k], s [..., k], v [..., n, k] (fp32 accumulate)."""
    return (upcast(u) * upcast(s).unsqueeze(-2)) @ upcast(v).mT

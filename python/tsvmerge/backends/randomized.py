"""Randomized, batched truncated SVD in pure torch ops (CPU and CUDA).

One shape group (L layers x T tasks) goes through one batched Halko-Martinsson-Tropp range
finder. Fast backends subclass this and override the hooks (`sketch`, `delta_matmul`,
`delta_matmul_t`, `orthonormalize`, `sym_eigh`, `gram`, `lowrank_apply`).
"""
from __future__ import annotations

import functools

import torch

from .. import primitives as P
from . import fast_polar, lapack
from ..options import Option, boolean, non_negative_int
from .base import Backend, TaskSVD
from .reference import exact_task_svd


_serial_cholesky_r_inv = lapack.serially(P.cholesky_r_inv)


class TorchBackend(Backend):
    name = "torch"
    OPTIONS = (
        Option("svd", str, "randomized", "top-k SVD of each task matrix", choices=("randomized", "exact")),
        Option("oversample", non_negative_int, 10, "oversampling p of the randomized SVD"),
        Option("power_iters", non_negative_int, 1, "Krylov blocks (or power iterations) q after the sketch"),
        Option("krylov", boolean, True, "block Krylov range finder; off: subspace iteration"),
        Option("energy_estimate", boolean, True, "estimate each tensor's captured energy for the report"),
    )

    def __init__(self, device="cpu", compute_dtype=torch.float32, seed=0, **options):
        super().__init__(device, compute_dtype, seed, **options)
        o = self.options
        self.svd, self.oversample, self.power_iters = o["svd"], o["oversample"], o["power_iters"]
        self.krylov, self.energy_estimate = o["krylov"], o["energy_estimate"]

    def describe(self) -> dict:
        return {**super().describe(), "svd": self.svd, "oversample": self.oversample, "power_iters": self.power_iters,
                "krylov": self.krylov}

    # -- hooks ------------------------------------------------------------------------
    def sketch(self, finetuned, base, c, transposed=False):
        """tau Omega, or tau^T Omega when transposed, with Omega seeded Gaussian [n or m, c]."""
        dim = finetuned.shape[-2] if transposed else finetuned.shape[-1]
        omega = P.gaussian_sketch(dim, c, self.seed, finetuned.device, self.compute_dtype)
        omega = omega.expand(*finetuned.shape[:2], -1, -1)
        return self.delta_matmul_t(finetuned, base, omega) if transposed else self.delta_matmul(finetuned, base, omega)

    def delta_matmul(self, finetuned, base, x):
        return P.delta_matmul(finetuned, base, x)

    def delta_matmul_t(self, finetuned, base, y):
        return P.delta_matmul_t(finetuned, base, y)

    def orthonormalize(self, y, passes=2):
        return P.orthonormalize(y, passes, r_inv=_serial_cholesky_r_inv)

    def factor_gram(self, x):
        """In x's dtype on CPU: `fast_polar.polar_root` decides per matrix whether that is
        precise enough, and rebuilds the Gram in fp64 where it is not. On CUDA in fp64 (the
        kernels' path): tasks that share directions make x ill-conditioned (cond(x^T x)
        ~ 1e8 on these zoos' square sides), and an fp32 Gram loses that."""
        if x.is_cuda:
            return self.gram(x.double())
        return fast_polar.gram_sym(x)

    def polar(self, x, how="procrustes", g=None):
        return x @ self.polar_root(x, how, g)

    def polar_root(self, x, how="procrustes", g=None):
        """Procrustes as the polar factor through the small side: R = (x^T x)^(-1/2) from the
        K x K Gram, an eigh of K x K instead of an SVD of m x K (the same factor; null
        directions dropped as in `primitives.polar`). `whiten`: the paper's clamp, on an
        fp64 Gram."""
        if how == "whiten":
            g = g if g is not None and g.dtype == torch.float64 else fast_polar.gram_sym(x.double())
            return P.inv_sqrt_psd(g, eigh=self.sym_eigh, out_dtype=x.dtype)
        if how != "procrustes":
            raise ValueError(f"unknown orthogonalize={how!r} (choose 'procrustes' or 'whiten')")
        return fast_polar.polar_root(x, self.factor_gram(x) if g is None else g, eigh=self.sym_eigh)

    # -- the range finder -------------------------------------------------------------
    def task_svd(self, finetuned, base, k):
        m, n = finetuned.shape[-2:]
        c = min(k + self.oversample, m, n)
        # A sketch as wide as the short side spans all of it (T = 1): the exact SVD costs no
        # more, and the square sketch would be ill-conditioned (cond ~ 1e4 seen at 96 x 96).
        if self.svd == "exact" or c == min(m, n):
            return exact_task_svd(finetuned, base, k, self.compute_dtype)
        # The range finder works on tau^T when m > n, so its basis lives on the short side:
        # orthonormalising it costs (side) x c^2 per step, the products cost the same.
        transposed = m > n
        fwd, bwd = functools.partial(self.delta_matmul, finetuned, base), functools.partial(self.delta_matmul_t, finetuned, base)
        if transposed:
            fwd, bwd = bwd, fwd
        probe = self._energy_probe(finetuned.shape[:2], m if transposed else n) if self.energy_estimate else None
        range_finder = self._krylov_range if self.krylov else self._power_range
        qs, bts, residual = range_finder(self.sketch(finetuned, base, c, transposed), fwd, bwd, probe)
        # Small SVD of B through eigh of B B^T (w x w, fp64: Krylov bases carry zero
        # columns, and fp32 syevd may fail on such a spread), eigenvalues ascending.
        lam, w = self.sym_eigh(self._block_gram(bts).double())
        lam, w = lam.flip(-1)[..., :k].clamp_min(0).to(bts[0].dtype), w.flip(-1)[..., :k].to(bts[0].dtype)
        s = lam.sqrt()
        ws = w.split([b.shape[-1] for b in bts], dim=-2)
        u, v = _blocks_times(qs, ws), _blocks_times(bts, ws)
        v /= s.clamp_min(torch.finfo(s.dtype).tiny).unsqueeze(-2)
        energy = None if probe is None else self._captured_energy(s, k, residual)
        return TaskSVD(v, s, u, energy) if transposed else TaskSVD(u, s, v, energy)

    def _block_gram(self, blocks):
        """[b_1 ... b_j]^T [b_1 ... b_j] from the blocks, without concatenating them."""
        rows = [[self.gram(bi) if i == j else bi.mT @ bj for j, bj in enumerate(blocks)] for i, bi in enumerate(blocks)]
        return torch.cat([torch.cat(row, -1) for row in rows], -2)

    # The range finders get the sketch Y = A Omega and the products x -> A x, y -> A^T y,
    # where A is tau or tau^T, and return the blocks of Q and of B^T = A^T Q.
    def _power_range(self, y, fwd, bwd, probe=None):
        """Subspace iteration: Q = orth((A A^T)^q A Omega); 2q + 2 products."""
        # Intermediate bases need only be well conditioned (one Cholesky-QR pass); the
        # final one is orthonormal to working precision.
        q = self.orthonormalize(y, passes=1 if self.power_iters else 2)
        tx = fwd(probe) if probe is not None and self.power_iters == 0 else None
        for i in range(self.power_iters):
            last = i == self.power_iters - 1
            z = self.orthonormalize(bwd(q), passes=1)
            y, tx = _forward_with_probe(fwd, z, probe if last else None)
            q = self.orthonormalize(y, passes=2 if last else 1)
        bt, residual = _backward_with_residual(bwd, q, [q], tx)
        return [q], [bt], residual

    def _krylov_range(self, y, fwd, bwd, probe=None):
        """Block Krylov (Musco & Musco 2015): Q spans [A Omega, (A A^T) A Omega, ...];
        2q + 2 products, and A^T Q is assembled from the products already made. Q and
        A^T Q stay as lists of blocks: concatenating them costs more than it saves."""
        q = self.orthonormalize(y)
        tx = fwd(probe) if probe is not None and self.power_iters == 0 else None
        bt, residual = _backward_with_residual(bwd, q, [q], tx)
        qs, bts = [q], [bt]
        for i in range(self.power_iters):
            y, tx = _forward_with_probe(fwd, bts[-1], probe if i == self.power_iters - 1 else None)
            # rounding noise left after the projection is ~ eps sqrt(m) of y's size; 10x that
            # (in norm) as the floor, or noise directions above it become basis vectors that
            # are not orthogonal to Q (seen on 1 in 150 T = 1 zoos, where Q spans all)
            floor = torch.linalg.vector_norm(y, dim=(-2, -1)).double() ** 2 * (y.shape[-2] * (10 * torch.finfo(y.dtype).eps) ** 2)
            y = _project_out(_project_out(y, qs), qs)                      # block Gram-Schmidt, twice
            q = P.range_basis(P.range_basis(y, floor, eigh=self.sym_eigh), eigh=self.sym_eigh)  # converged -> zero columns
            qs.append(q)
            bt, residual = _backward_with_residual(bwd, q, qs, tx)
            bts.append(bt)
        return qs, bts, residual

    # -- the captured-energy estimate, carried by the range finder's last two products --
    def _energy_probe(self, batch_shape, dim, block=4):
        """Orthonormal random X [L, T, dim, block] for one power step on R^T R."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 1)
        x = torch.randn(*batch_shape, dim, block, generator=gen)
        return self.orthonormalize(x.to(self.device, self.compute_dtype))

    def _captured_energy(self, s, k, residual):
        """An estimate of kept sum s^2 / exact top-k sum s^2, without the exact SVD.

        By Weyl, sigma_i(A)^2 <= sigma_i(QQ^T A)^2 + ||(I - QQ^T) A||_2^2, so the exact
        top-k energy is at most kept + k ||R||_2^2: a lower bound on the ratio, given
        ||R||_2. ||R||_2^2 is estimated from below, from Z = R X and W = R^T R X (random
        orthonormal X), as the larger of ||W||_2 and max ||W x||^2 / ||Z x||^2 over the
        directions x where Z stands clear of rounding. The second is exact when X meets R's
        top right singular vector, whatever the overlap, which scales the first down (it
        matters when X lives on the long side). The bound is then approximate, and in
        practice loose on the safe side.
        """
        rx, rtr, floor = residual
        kept = (s.double() ** 2).sum(-1)
        w = self.gram(rtr).double()
        r2 = self.sym_eigh(w)[0][..., -1].clamp_min(0).sqrt()
        lam, vec = self.sym_eigh(self.gram(rx).double())
        scale = torch.where(lam > floor.unsqueeze(-1), lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), torch.zeros_like(lam))
        whiten = vec * scale.unsqueeze(-2)
        r2 = torch.maximum(r2, self.sym_eigh(whiten.mT @ w @ whiten)[0][..., -1])
        return (kept / (kept + k * r2).clamp_min(1e-300)).clamp(max=1.0).cpu()


def _forward_with_probe(fwd, z, probe):
    """(A z, A X): the energy probe X rides along a product the range finder makes anyway."""
    if probe is None:
        return fwd(z), None
    y = fwd(torch.cat([z, probe], -1))
    return y[..., :z.shape[-1]], y[..., z.shape[-1]:]


def _backward_with_residual(bwd, q, basis, tx):
    """(A^T q, (R X, R^T R X, floor)): with R X = (I - Q Q^T) A X (Q = the blocks of
    `basis`, complete), R^T R X = A^T R X, so it rides along the last product A^T q.
    `floor`: a squared norm of R X below which it may be rounding (1000x the projection's)."""
    if tx is None:
        return bwd(q), None
    rx = _project_out(tx, basis)
    out = bwd(torch.cat([q, rx], -1))
    floor = torch.linalg.vector_norm(tx, dim=(-2, -1)).double() ** 2 * (tx.shape[-2] * (1e3 * torch.finfo(tx.dtype).eps) ** 2)
    return out[..., :q.shape[-1]], (rx, out[..., q.shape[-1]:], floor)


def _project_out(y, blocks):
    """(I - sum_b b b^T) y for orthonormal blocks b [..., m, c] of one basis, y [..., m, w];
    the subtraction fused into the GEMM (baddbmm)."""
    flat = y.reshape(-1, *y.shape[-2:])
    for b in blocks:
        b = b.reshape(-1, *b.shape[-2:])
        flat = torch.baddbmm(flat, b, b.mT @ flat, alpha=-1)
    return flat.reshape(y.shape)


def _blocks_times(blocks, ws):
    """[b_1 ... b_j] @ [w_1; ...; w_j] = sum_i b_i w_i, without concatenating the blocks."""
    out = blocks[0] @ ws[0]
    for b, w in zip(blocks[1:], ws[1:]):
        flat = out.reshape(-1, *out.shape[-2:])
        flat.baddbmm_(b.reshape(-1, *b.shape[-2:]), w.reshape(-1, *w.shape[-2:]))
    return out

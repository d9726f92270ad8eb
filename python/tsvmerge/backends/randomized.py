"""Randomized, batched truncated SVD in pure torch ops (CPU and CUDA).

One shape group (L layers x T tasks) goes through one batched Halko-Martinsson-Tropp range
finder. Fast backends subclass this and override the hooks (`sketch`, `delta_matmul`,
`delta_matmul_t`, `orthonormalize`, `sym_eigh`, `gram`, `lowrank_apply`).
"""
from __future__ import annotations

import torch

from .. import primitives as P
from .base import Backend, TaskSVD
from .reference import exact_task_svd


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device="cpu", compute_dtype=torch.float32, seed=0, *, svd="randomized",
                 oversample=10, power_iters=1, krylov=True, energy_estimate=True, **options):
        super().__init__(device, compute_dtype, seed, **options)
        if svd not in ("randomized", "exact"):
            raise ValueError(f"svd must be 'randomized' or 'exact', not {svd!r}")
        self.svd = svd
        self.oversample = int(oversample)
        self.power_iters = int(power_iters)
        self.krylov = bool(krylov)
        self.energy_estimate = bool(energy_estimate)

    # -- hooks ------------------------------------------------------------------------
    def sketch(self, finetuned, base, c):
        omega = P.gaussian_sketch(finetuned.shape[-1], c, self.seed, finetuned.device, self.compute_dtype)
        return self.delta_matmul(finetuned, base, omega.expand(*finetuned.shape[:2], -1, -1))

    def delta_matmul(self, finetuned, base, x):
        return P.delta_matmul(finetuned, base, x)

    def delta_matmul_t(self, finetuned, base, y):
        return P.delta_matmul_t(finetuned, base, y)

    def orthonormalize(self, y, passes=2):
        return P.orthonormalize(y, passes)

    def factor_gram(self, x, block=None):
        """In fp64: tasks that share directions make x ill-conditioned (cond ~ 5e3 seen on
        a 96 x 96 layer of 3 tasks), and an fp32 Gram squares that past 1/eps."""
        return self.gram(x.double(), block)

    def orthogonalize(self, x, how="procrustes", block=None, g=None):
        """Procrustes as the polar factor through the small side: x (x^T x)^(-1/2) from the
        K x K Gram, an eigh of K x K instead of an SVD of m x K (the same factor; null
        directions dropped as in `primitives.polar`). `whiten` is the base class's route."""
        if how != "procrustes":
            return super().orthogonalize(x, how, block, g)
        g = self.factor_gram(x, block) if g is None else g
        return x @ P.inv_sqrt_psd(g, range_only=True, eigh=self.sym_eigh, data_dtype=x.dtype).to(x.dtype)

    # -- the range finder -------------------------------------------------------------
    def task_svd(self, finetuned, base, k):
        if self.svd == "exact":
            return exact_task_svd(finetuned, base, k, self.compute_dtype)
        m, n = finetuned.shape[-2:]
        c = min(k + self.oversample, m, n)
        range_finder = self._krylov_range if self.krylov else self._power_range
        q, bt = range_finder(finetuned, base, c)                           # Q [L,T,m,w], B^T = tau^T Q
        # Small SVD of B through eigh of B B^T (w x w, fp64: Krylov bases carry zero
        # columns, and fp32 syevd may fail on such a spread), eigenvalues ascending.
        lam, w = self.sym_eigh(self.gram(bt).double())
        lam, w = lam.flip(-1)[..., :k].clamp_min(0).to(bt.dtype), w.flip(-1)[..., :k].to(bt.dtype)
        s = lam.sqrt()
        u = q @ w
        v = (bt @ w) / s.clamp_min(torch.finfo(s.dtype).tiny).unsqueeze(-2)
        energy = self._captured_energy(finetuned, base, q, s, k) if self.energy_estimate else None
        return TaskSVD(u, s, v, energy)

    def _power_range(self, finetuned, base, c):
        """Subspace iteration: Q = orth((tau tau^T)^q tau Omega); 2q + 2 products."""
        # Intermediate bases need only be well conditioned (one Cholesky-QR pass); the
        # final one is orthonormal to working precision.
        q = self.orthonormalize(self.sketch(finetuned, base, c), passes=1 if self.power_iters else 2)
        for i in range(self.power_iters):
            z = self.orthonormalize(self.delta_matmul_t(finetuned, base, q), passes=1)   # [L, T, n, c]
            q = self.orthonormalize(self.delta_matmul(finetuned, base, z), passes=2 if i == self.power_iters - 1 else 1)
        return q, self.delta_matmul_t(finetuned, base, q)

    def _krylov_range(self, finetuned, base, c):
        """Block Krylov (Musco & Musco 2015): Q spans [tau Omega, (tau tau^T) tau Omega, ...];
        2q + 2 products, and tau^T Q is assembled from the products already made."""
        q = self.orthonormalize(self.sketch(finetuned, base, c))
        blocks, bts = [q], [self.delta_matmul_t(finetuned, base, q)]
        for _ in range(self.power_iters):
            y = self.delta_matmul(finetuned, base, bts[-1])
            # rounding noise left after the projection is ~ eps sqrt(m) of y's size
            floor = y.double().pow(2).sum((-2, -1)) * (y.shape[-2] * torch.finfo(y.dtype).eps ** 2)
            for _ in range(2):                                             # block Gram-Schmidt, twice
                for b in blocks:
                    y = y - b @ (b.transpose(-1, -2) @ y)
            q = P.range_basis(P.range_basis(y, floor))                     # converged directions -> zero columns
            blocks.append(q)
            bts.append(self.delta_matmul_t(finetuned, base, q))
        return torch.cat(blocks, -1), torch.cat(bts, -1)

    def _captured_energy(self, finetuned, base, q, s, k, iters=2, block=4):
        """A lower bound on kept sum s^2 / exact top-k sum s^2, without the exact SVD.

        By Weyl, sigma_i(A)^2 <= sigma_i(QQ^T A)^2 + ||(I - QQ^T) A||_2^2, so the exact
        top-k energy is at most kept + k ||R||_2^2. The residual's spectral norm comes from
        a short block power iteration on R^T R (thin products: memory-bound passes).
        """
        kept = (s.double() ** 2).sum(-1)
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 1)
        x = torch.randn(*finetuned.shape[:2], finetuned.shape[-1], block, generator=gen).to(q.device, q.dtype)
        for _ in range(iters):
            x = self.orthonormalize(x)
            y = self.delta_matmul(finetuned, base, x)
            y = y - q @ (q.transpose(-1, -2) @ y)                      # R x
            x = self.delta_matmul_t(finetuned, base, y)                 # R^T R x
        r2 = self.sym_eigh(self.gram(x).double())[0][..., -1].clamp_min(0).sqrt()  # ||R^T R x||_2 ~ ||R||_2^2
        return (kept / (kept + k * r2).clamp_min(1e-300)).clamp(max=1.0).cpu()

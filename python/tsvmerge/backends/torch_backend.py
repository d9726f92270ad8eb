"""The `torch` backend: randomized, batched truncated SVDs in pure torch ops (CPU and CUDA).

Its range finders are in `krylov.py`; this module holds the options, the hooks they call and
the polar factor. Fast backends subclass it and override the hooks (`sketch`, `delta_matmul`,
`delta_matmul_t`, `orthonormalize`, `sym_eigh`, `gram`, `lowrank_apply`).
"""
from __future__ import annotations

import torch

from .. import primitives as P
from . import fast_polar, krylov, lapack
from ..options import Option, boolean, fraction, non_negative_int, optional, positive_int
from .base import Backend
from .reference import exact_task_svd

# The default energy target (kept sum s^2 over the exact top-k sum, per task matrix) and the
# cap on passes over a task matrix: 3 for the sketch and the first block, 2 per block after it.
DEFAULT_ENERGY_TARGET = 0.995
DEFAULT_MAX_PASSES = 9


_serial_cholesky_r_inv = lapack.serially(P.cholesky_r_inv)


def _pass_cap(x) -> int:
    """At least 3: the sketch, one Krylov block (two passes) and its bound."""
    value = positive_int(x)
    if value < 3:
        raise ValueError("expected a whole number of at least 3 (the sketch and one Krylov block)")
    return value


class TorchBackend(Backend):
    name = "torch"
    OPTIONS = (
        Option("svd", str, "randomized", "top-k SVD of each task matrix", choices=("randomized", "exact")),
        Option("oversample", non_negative_int, 10, "oversampling p of the randomized SVD"),
        Option("power_iters", non_negative_int, 1,
               "fixed schedule: Krylov blocks (or power iterations) q after the sketch (choosing it sets energy_target none)"),
        Option("krylov", boolean, True, "fixed schedule: block Krylov range finder; off: subspace iteration"),
        Option("energy_estimate", boolean, True, "estimate each tensor's captured energy for the report"),
        Option("energy_target", optional(fraction), DEFAULT_ENERGY_TARGET,
               "Krylov blocks per task matrix until a bound on its captured energy reaches this "
               "('none': the fixed schedule of power_iters)"),
        Option("max_passes", _pass_cap, DEFAULT_MAX_PASSES, "cap on passes over each task matrix (energy_target)"),
    )

    def __init__(self, device="cpu", compute_dtype=torch.float32, seed=0, **options):
        super().__init__(device, compute_dtype, seed, **options)
        o = self.options
        self.svd, self.oversample, self.power_iters = o["svd"], o["oversample"], o["power_iters"]
        self.krylov, self.energy_estimate = o["krylov"], o["energy_estimate"]
        self.energy_target, self.max_passes = o["energy_target"], o["max_passes"]
        # power_iters and krylov describe the fixed schedule: giving one chooses it
        fixed = sorted({"power_iters", "krylov"} & set(options))
        if fixed and "energy_target" not in options:
            self.energy_target = None
        if self.energy_target is not None and (fixed or not self.energy_estimate):
            raise ValueError(f"energy_target={self.energy_target} adds Krylov blocks to an energy target; "
                             f"{', '.join(fixed) or 'energy_estimate=False'} only goes with "
                             "energy_target=None (the fixed schedule)")

    def describe(self) -> dict:
        return {**super().describe(), "svd": self.svd, "oversample": self.oversample, "power_iters": self.power_iters,
                "krylov": self.krylov, "energy_target": self.energy_target, "max_passes": self.max_passes}

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

    # -- the task SVDs ----------------------------------------------------------------
    def task_svd(self, finetuned, base, k):
        m, n = finetuned.shape[-2:]
        c = min(k + self.oversample, m, n)
        # A sketch as wide as the short side spans all of it (T = 1): the exact SVD costs no
        # more, and the square sketch would be ill-conditioned (cond ~ 1e4 seen at 96 x 96).
        if self.svd == "exact" or c == min(m, n):
            return exact_task_svd(finetuned, base, k, self.compute_dtype)
        if self.energy_target is not None:
            return krylov.adaptive_svd(self, finetuned, base, k, c)
        return krylov.fixed_svd(self, finetuned, base, k, c)

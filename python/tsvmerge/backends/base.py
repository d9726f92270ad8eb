"""What a backend provides to the methods. Methods never know which backend runs."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from .. import primitives as P
from ..options import Option, resolve
from . import lapack


@dataclass
class TaskSVD:
    """Top-k factors of every task matrix of a batch: tau_{l,t} ~= u diag(s) v^T."""
    u: torch.Tensor        # [L, T, m, k]
    s: torch.Tensor        # [L, T, k], descending
    v: torch.Tensor        # [L, T, n, k]
    energy: torch.Tensor   # [L, T]: kept sum s^2 over the exact top-k sum s^2 (1.0 when exact), or a bound on it
    passes: torch.Tensor | None = None   # [L, T]: passes over each task matrix (randomized SVDs)
    capped: torch.Tensor | None = None   # [L, T]: stopped at the pass cap below the energy target


class Backend:
    """Exact, device-agnostic defaults; fast backends override the expensive steps."""

    name = "base"
    # The options this backend takes, declared once; merge() and the command line derive theirs.
    OPTIONS: tuple[Option, ...] = ()

    def __init__(self, device: str | torch.device = "cpu", compute_dtype: torch.dtype = torch.float32,
                 seed: int = 0, **options):
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.seed = int(seed)
        self.options = resolve(self.OPTIONS, options, f"backend {self.name!r}")
        self.fallbacks = Counter()  # (primitive, why) -> calls a kernel declined

    # -- spectral steps -------------------------------------------------------------
    def task_svd(self, finetuned: torch.Tensor, base: torch.Tensor | None, k: int) -> TaskSVD:
        """Top-k factors of each theta_i - theta_0: finetuned [L, T, m, n], base [L, m, n].

        With base=None, `finetuned` already holds the task vectors (what the engine passes).
        """
        raise NotImplementedError

    def polar(self, x: torch.Tensor, how: str = "procrustes", g: torch.Tensor | None = None) -> torch.Tensor:
        """The orthogonal factor of concatenated panels x [L, m, K]: "procrustes", the polar
        factor (on x's range); "whiten", x (x^T x)^(-1/2) with the paper's clamp. `g` =
        factor_gram(x) where the caller has it."""
        if how == "procrustes":
            return P.polar(x)
        if how == "whiten":
            return P.whiten(x, self.factor_gram(x) if g is None else g, eigh=self.sym_eigh)
        raise ValueError(f"unknown orthogonalize={how!r} (choose 'procrustes' or 'whiten')")

    def polar_root(self, x: torch.Tensor, how: str = "procrustes",
                   g: torch.Tensor | None = None) -> torch.Tensor | None:
        """R [L, K, K] with polar(x) = x @ R, or None where the backend takes the factor from x
        itself (the exact path: from x's SVD, as the paper does)."""
        return None

    def factor_gram(self, x: torch.Tensor) -> torch.Tensor:
        """The Gram x^T x of concatenated factors, as STI and `polar` use it."""
        return self.gram(x)

    def sym_eigh(self, a: torch.Tensor):
        return lapack.sym_eigh(a)

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        return P.gram(x)

    def lowrank_apply(self, base, u, s, v, alpha: float, out_dtype: torch.dtype) -> torch.Tensor:
        return P.lowrank_apply(base, u, s, v, alpha, out_dtype)

    # -- what ran -------------------------------------------------------------------
    def declined(self, primitive: str, why: str) -> None:
        """Records that a kernel declined an input of `primitive`, which then ran in torch."""
        self.fallbacks[primitive, why] += 1

    def fallback_report(self) -> dict:
        """{primitive: {why: calls}} of every declined input so far."""
        out = {}
        for (primitive, why), calls in sorted(self.fallbacks.items()):
            out.setdefault(primitive, {})[why] = calls
        return out

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device),
                "compute_dtype": str(self.compute_dtype).replace("torch.", ""), "seed": self.seed}

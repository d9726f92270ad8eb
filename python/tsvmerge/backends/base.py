"""What a backend provides to the methods. Methods never know which backend runs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import primitives as P
from . import lapack


@dataclass
class TaskSVD:
    """Top-k factors of every task matrix of a batch: tau_{l,t} ~= u diag(s) v^T."""
    u: torch.Tensor        # [L, T, m, k]
    s: torch.Tensor        # [L, T, k], descending
    v: torch.Tensor        # [L, T, n, k]
    energy: torch.Tensor   # [L, T]: kept sum s^2 over the exact top-k sum s^2 (1.0 when exact)


class Backend:
    """Exact, device-agnostic defaults; fast backends override the expensive steps."""

    name = "base"

    def __init__(self, device: str | torch.device = "cpu", compute_dtype: torch.dtype = torch.float32,
                 seed: int = 0, **options):
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.seed = int(seed)
        self.options = options

    # -- spectral steps -------------------------------------------------------------
    def task_svd(self, finetuned: torch.Tensor, base: torch.Tensor | None, k: int) -> TaskSVD:
        """Top-k factors of each theta_i - theta_0: finetuned [L, T, m, n], base [L, m, n].

        With base=None, `finetuned` already holds the task vectors (what the engine passes).
        """
        raise NotImplementedError

    def orthogonalize(self, x: torch.Tensor, how: str = "procrustes", block: int | None = None,
                      g: torch.Tensor | None = None) -> torch.Tensor:
        """Orthogonal factor of concatenated panels x [L, m, K]; `block` = k when x is T
        orthonormal k-column panels side by side (the Gram's diagonal blocks are then I);
        `g` = factor_gram(x, block) when the caller has it already."""
        if how == "procrustes":
            return P.polar(x)
        if how == "whiten":
            return P.whiten(x, self.factor_gram(x, block) if g is None else g, eigh=self.sym_eigh)
        raise ValueError(f"unknown orthogonalize={how!r} (choose 'procrustes' or 'whiten')")

    def orthogonal_root(self, x: torch.Tensor, how: str = "procrustes", block: int | None = None,
                        g: torch.Tensor | None = None) -> torch.Tensor | None:
        """R [L, K, K] with orthogonalize(x) = x @ R, or None where the backend orthogonalises
        x directly (the exact path takes the polar factor from x's SVD, as the paper does)."""
        return None

    def factor_gram(self, x: torch.Tensor, block: int | None = None) -> torch.Tensor:
        """The Gram x^T x of concatenated factors, as STI and orthogonalisation use it."""
        return self.gram(x, block)

    def sym_eigh(self, a: torch.Tensor):
        return lapack.sym_eigh(a)

    def gram(self, x: torch.Tensor, task_block: int | None = None) -> torch.Tensor:
        """x^T x; fast backends skip the known identity blocks when task_block is given."""
        return P.gram(x)

    def lowrank_apply(self, base, u, s, v, alpha: float, out_dtype: torch.dtype) -> torch.Tensor:
        return P.lowrank_apply(base, u, s, v, alpha, out_dtype)

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device),
                "compute_dtype": str(self.compute_dtype).replace("torch.", ""), "seed": self.seed}

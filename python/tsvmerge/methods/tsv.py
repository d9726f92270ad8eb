"""TSV-Merge (Gargiulo et al., CVPR 2025), and the steps it shares with the STI analysis."""
from dataclasses import dataclass

import torch

from ..lowrank import drop_null_directions
from ..options import Option, optional, positive_int
from . import LowRank, register

ORTHOGONALIZE = ("procrustes", "whiten")


def concat_tasks(x: torch.Tensor) -> torch.Tensor:
    """[L, T, m, k] -> [L, m, T*k]: the task panels side by side, [X_1 ... X_T]."""
    L, T, m, k = x.shape
    return x.permute(0, 2, 1, 3).reshape(L, m, T * k)


def sti(gu: torch.Tensor, s: torch.Tensor, gv: torch.Tensor) -> torch.Tensor:
    """Singular Task Interference ||(U^T U - I) diag(s) (V^T V - I)||_1 per layer, from the
    Gram matrices gu = U^T U and gv = V^T V: [L]. In s's dtype: a statistic, and the Grams
    may be fp64 for orthogonalisation's sake."""
    gu, gv = gu.to(s.dtype), gv.to(s.dtype)
    eye = torch.eye(gu.shape[-1], dtype=gu.dtype, device=gu.device)
    return ((gu - eye) * s.unsqueeze(-2) @ (gv - eye)).abs().sum((-2, -1))


@dataclass
class Concatenated:
    """Every task's top-k factors side by side (steps 2-3 of TSV-M), with their Grams."""
    u: torch.Tensor         # [L, m, T*k]
    s: torch.Tensor         # [L, T*k]
    v: torch.Tensor         # [L, n, T*k]
    gu: torch.Tensor        # U^T U, shared by STI and orthogonalisation
    gv: torch.Tensor
    k: int
    energy: torch.Tensor    # [L, T], see TaskSVD
    passes: torch.Tensor | None = None
    capped: torch.Tensor | None = None


def concatenated_factors(tau, k: int, backend, svd=None) -> Concatenated:
    """The task SVDs of a batch (or those the engine made from stored factors, `svd`), each
    task's null directions dropped (`lowrank.drop_null_directions`), concatenated across tasks."""
    if svd is None:
        svd = backend.task_svd(tau, None, k)
    svd = drop_null_directions(svd)
    u, s, v = concat_tasks(svd.u), svd.s.flatten(1), concat_tasks(svd.v)
    k = svd.s.shape[-1]
    return Concatenated(u, s, v, backend.factor_gram(u), backend.factor_gram(v), k, svd.energy, svd.passes, svd.capped)


@register("tsv", spectral=True, options=(
    Option("k", optional(positive_int), None, "per-task rank (default floor(min(m, n) / T))"),
    Option("orthogonalize", str, "procrustes", "how to orthogonalise the concatenated factors", choices=ORTHOGONALIZE),
))
def tsv(base, tau, *, path, k, backend, svd=None, orthogonalize, **_):
    """TSV-M: top-k SVD per task, orthogonalise the concatenated factors, rebuild."""
    if path != "spectral":
        return tau.mean(1), {}
    f = concatenated_factors(tau, k, backend, svd)
    stats = {"energy": f.energy, "passes": f.passes, "capped": f.capped, "sti": sti(f.gu, f.s, f.gv)}
    ru, rv = (backend.polar_root(x, orthogonalize, g) for x, g in ((f.u, f.gu), (f.v, f.gv)))
    if ru is None:
        uo, vo = (backend.polar(x, orthogonalize, g) for x, g in ((f.u, f.gu), (f.v, f.gv)))
        return LowRank(uo, f.s, vo), stats
    return folded_update(f.u, ru, f.s, rv, f.v), stats


def folded_update(u, ru, s, rv, v) -> LowRank:
    """Delta = (U ru) diag(s) (V rv)^T with the K x K core ru diag(s) rv^T folded into the
    shorter factor: a K x K x K product instead of the longer side's m x K x K one (a
    3072 x 768 layer at K = 768 makes 2 K^3 of these flops instead of 5 K^3)."""
    core = (ru * s.unsqueeze(-2)) @ rv.mT
    ones = torch.ones_like(s)
    if u.shape[-2] >= v.shape[-2]:
        return LowRank(u, ones, v @ core.mT)
    return LowRank(u @ core, ones, v)

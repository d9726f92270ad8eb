"""TSV-Merge (Gargiulo et al., CVPR 2025), and the steps it shares with the STI analysis."""
import dataclasses
from dataclasses import dataclass

import torch

from ..lowrank import drop_null_directions
from ..options import Option, optional
from ..plan import rank_budget
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


def concatenated_factors(tau, k: int, backend, svd=None, ranks=None) -> Concatenated:
    """The task SVDs of a batch (or those the engine made from stored factors, `svd`), each
    task's null directions dropped (`lowrank.drop_null_directions`), concatenated across tasks.
    With per-task `ranks` [L, T] (an energy budget), task t keeps its top ranks[:, t] triplets
    and the kept columns are packed side by side, width <= r: no Gram over padding."""
    if svd is None:
        svd = backend.task_svd(tau, None, k)
    if ranks is not None:
        kept = torch.arange(svd.s.shape[-1], device=svd.s.device) < ranks.to(svd.s.device).unsqueeze(-1)
        svd = dataclasses.replace(svd, s=svd.s * kept.to(svd.s.dtype))
    svd = drop_null_directions(svd)
    u, s, v = concat_tasks(svd.u), svd.s.flatten(1), concat_tasks(svd.v)
    if ranks is not None:
        u, s, v = pack_columns(u, s, v)
    k = svd.s.shape[-1]
    return Concatenated(u, s, v, backend.factor_gram(u), backend.factor_gram(v), k, svd.energy, svd.passes, svd.capped)


def pack_columns(u, s, v):
    """The columns with s > 0 first, in order, cut to the most any layer keeps (the rest are
    the zero columns `drop_null_directions` left)."""
    keep = s > 0
    width = max(1, int(keep.sum(-1).max()))
    idx = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :width]
    return (u.gather(-1, idx.unsqueeze(-2).expand(-1, u.shape[-2], -1)), s.gather(-1, idx),
            v.gather(-1, idx.unsqueeze(-2).expand(-1, v.shape[-2], -1)))


def energy_ranks(s: torch.Tensor, share: float, r: int) -> torch.Tensor:
    """Per task, the smallest rank whose sum s^2 holds `share` of the task's whole sum s^2
    (s [L, T, w] descending, the task's full spectrum), [L, T]; where the ranks of a layer add
    up to more than r, each is scaled by r / sum and rounded down, and the ranks left over go to
    the largest remainders (ties to the earlier task): the ranks then sum to r exactly."""
    energy = s.double().square().cumsum(-1)
    ranks = (energy < share * energy[..., -1:]).sum(-1).add(1).clamp_max(s.shape[-1])
    total = ranks.sum(-1, keepdim=True)
    quota = ranks.double() * r / total
    floor = quota.floor()
    left = r - floor.sum(-1, keepdim=True)
    place = torch.argsort(torch.argsort(floor - quota, dim=-1, stable=True), dim=-1)   # 0: largest remainder
    shrunk = (floor + (place < left).double()).long()
    return torch.where(total > r, shrunk, ranks)


@register("tsv", spectral=True, options=(
    Option("k", optional(rank_budget), None,
           "per-task rank (default floor(min(m, n) / T)), or energy:F: per task the smallest rank keeping a share F "
           "of its spectral energy"),
    Option("orthogonalize", str, "procrustes", "how to orthogonalise the concatenated factors", choices=ORTHOGONALIZE),
))
def tsv(base, tau, *, path, k, backend, svd=None, orthogonalize, energy: float | None = None, **_):
    """TSV-M: top-k SVD per task, orthogonalise the concatenated factors, rebuild.

    `energy` (set by `merge()` from k="energy:F", where the plan loads every task's full
    spectrum: k = r) chooses each task's rank per tensor (`energy_ranks`)."""
    if path != "spectral":
        return tau.mean(1), {}
    ranks = None
    if energy is not None:
        svd = backend.task_svd(tau, None, k) if svd is None else svd
        ranks = energy_ranks(svd.s, energy, min(svd.u.shape[-2], svd.v.shape[-2]))
    f = concatenated_factors(tau, k, backend, svd, ranks)
    stats = {"energy": f.energy, "passes": f.passes, "capped": f.capped, "sti": sti(f.gu, f.s, f.gv)}
    if ranks is not None:
        stats["ranks"] = ranks
    return orthogonal_update(f.u, f.s, f.v, backend, orthogonalize, f.gu, f.gv), stats


def orthogonal_update(u, s, v, backend, how: str = "procrustes", gu=None, gv=None) -> LowRank:
    """Delta = polar(u) diag(s) polar(v)^T on the backend's polar route (gu, gv: the Grams
    where the caller has them)."""
    ru, rv = (backend.polar_root(x, how, g) for x, g in ((u, gu), (v, gv)))
    if ru is None:
        uo, vo = (backend.polar(x, how, g) for x, g in ((u, gu), (v, gv)))
        return LowRank(uo, s, vo)
    return folded_update(u, ru, s, rv, v)


def folded_update(u, ru, s, rv, v) -> LowRank:
    """Delta = (U ru) diag(s) (V rv)^T with the K x K core ru diag(s) rv^T folded into the
    shorter factor: a K x K x K product instead of the longer side's m x K x K one (a
    3072 x 768 layer at K = 768 makes 2 K^3 of these flops instead of 5 K^3)."""
    core = (ru * s.unsqueeze(-2)) @ rv.mT
    ones = torch.ones_like(s)
    if u.shape[-2] >= v.shape[-2]:
        return LowRank(u, ones, v @ core.mT)
    return LowRank(u @ core, ones, v)

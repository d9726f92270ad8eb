"""Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common
and Task-Specific Subspaces", ICML 2025): the merged update's singular values made equal.

Both see whole task matrices (the plan loads every triplet: `plan.full_rank`). Where the sum
or a task is rank-deficient (LoRA inputs, tiny tensors), its null directions are dropped
(`lowrank.drop_null_directions`) and the flat value is the mean of the kept singular values;
for full-rank sums, every real fine-tune, that is the paper's mean over all r.
"""
import torch

from ..lowrank import drop_null_directions
from ..options import Option, fraction
from ..plan import full_rank
from ..primitives import lowrank_product
from . import LowRank, register
from .tsv import orthogonal_update


def task_matrices(tau, svd):
    """[L, T, m, n]: tau as loaded, or, where some tasks are stored as factors, every task
    rebuilt from the SVDs the engine made (`svd` then covers all tasks, in order)."""
    return tau if svd is None else lowrank_product(svd.u, svd.s, svd.v).to(svd.s.dtype)


def sum_svd(tau, backend, k: int):
    """The top-k SVD of the summed task vectors (Task Arithmetic's update), null directions
    dropped: u [L, m, k'], s [L, k'], v [L, n, k'] with k' <= k."""
    svd = drop_null_directions(backend.task_svd(tau.sum(1, keepdim=True), None, k))
    return svd.u[:, 0], svd.s[:, 0], svd.v[:, 0]


def isotropic(s: torch.Tensor) -> torch.Tensor:
    """Every kept (s > 0) singular value replaced by their mean; dropped ones stay 0."""
    kept = (s > 0).to(s.dtype)
    return kept * (s.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1))


@register("iso_c", spectral=True, rank=full_rank)
def iso_c(base, tau, *, path, k, backend, svd=None, **_):
    """Iso-C: the SVD of the summed task vectors with its singular values replaced by their mean.

    Delta = mean(s) U V^T for sum_i tau_i = U diag(s) V^T; alpha on top. Other tensors: the mean.
    Backends with a polar route (`polar_root`) take U V^T as the sum's polar factor instead.
    """
    if path != "spectral":
        return tau.mean(1), {}
    total = task_matrices(tau, svd).sum(1)
    tall = total.shape[-2] >= total.shape[-1]
    x = total if tall else total.mT
    root = backend.polar_root(x)
    if root is None:        # the exact path: from the sum's SVD, as the paper does
        u, s, v = sum_svd(total.unsqueeze(1), backend, k)
        return LowRank(u, isotropic(s), v), {}
    # U V^T = polar(x) through the Gram (the fast backends), on x's range: a partial isometry p
    # with <p, x> = sum s (the nuclear norm) and <p, p> = rank, so mean(s) = <p, x> / <p, p>.
    # A LowRank update like every spectral one (a PEFT output takes it), p times the identity.
    p = x @ root
    flat = (p * x).sum((-2, -1)) / (p * p).sum((-2, -1)).clamp_min(1)
    s = flat.unsqueeze(-1).expand(-1, p.shape[-1])
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device).expand_as(root)
    return (LowRank(p, s, eye) if tall else LowRank(eye, s, p)), {}


def split_rank(r: int, T: int, common_space_fraction: float) -> tuple[int, int]:
    """(common, per_task): each task gets floor((r - floor(f r)) / T) directions and the
    common subspace the rest, so that common + T per_task = r and common >= floor(f r)."""
    per_task = (r - int(common_space_fraction * r)) // T
    return r - T * per_task, per_task


@register("iso_cts", spectral=True, rank=full_rank, options=(
    Option("common_space_fraction", fraction, 0.8, "share of the rank r = min(m, n) given to the common subspace"),
))
def iso_cts(base, tau, *, path, k, backend, svd=None, common_space_fraction, **_):
    """Iso-CTS: a common subspace of the summed task vectors plus each task's own directions
    outside it, orthogonalised together, with a flat spectrum.

    The common subspace is the sum's top `common` singular triplets; task t adds the top
    `per_task` triplets of (I - U_c U_c^T) tau_t (`split_rank`); the concatenated factors are
    orthogonalised as TSV-M does and every kept singular value replaced by their mean.
    """
    if path != "spectral":
        return tau.mean(1), {}
    tau = task_matrices(tau, svd)
    T = tau.shape[1]
    common, per_task = split_rank(k, T, common_space_fraction)
    u, s, v = (x[..., :common] for x in sum_svd(tau, backend, k))     # k = r: exact on every backend
    parts, stats = [(u, s, v)], {"ranks": torch.full(tau.shape[:2], per_task)}
    if per_task:
        own = []
        for t in range(T):      # one residual at a time: the batch's memory grows by 1/T, not 2x
            rest = tau[:, t] - u @ (u.mT @ tau[:, t])
            own.append(drop_null_directions(backend.task_svd(rest.unsqueeze(1), None, per_task)))
        parts += [(x.u[:, 0], x.s[:, 0], x.v[:, 0]) for x in own]
        for key in ("energy", "passes", "capped"):
            if all(getattr(x, key) is not None for x in own):
                stats[key] = torch.cat([getattr(x, key) for x in own], 1)
    u, s, v = (torch.cat([p[i] for p in parts], -1) for i in range(3))
    return orthogonal_update(u, isotropic(s), v, backend), stats

"""TSV-Merge (Gargiulo et al., CVPR 2025)."""
import torch

from . import LowRank, register


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


@register("tsv", spectral=True, options=("orthogonalize", "k", "report_sti"))
def tsv(base, tau, *, path, k=None, backend=None, svd=None, orthogonalize="procrustes",
        report_sti=True, **_):
    """TSV-M: top-k SVD per task, orthogonalise the concatenated factors, rebuild."""
    if path != "spectral":
        return tau.mean(1), {}
    if svd is None:
        svd = backend.task_svd(tau, None, k)
    u, s, v = concat_tasks(svd.u), svd.s.flatten(1), concat_tasks(svd.v)
    gu, gv = backend.factor_gram(u), backend.factor_gram(v)   # shared by STI and orthogonalisation
    stats = {"energy": svd.energy}
    if report_sti:
        stats["sti"] = sti(gu, s, gv)
    ru, rv = backend.polar_root(u, orthogonalize, gu), backend.polar_root(v, orthogonalize, gv)
    if ru is None:
        return LowRank(backend.polar(u, orthogonalize, gu), s, backend.polar(v, orthogonalize, gv)), stats
    return folded_update(u, ru, s, rv, v), stats


def folded_update(u, ru, s, rv, v) -> LowRank:
    """Delta = (U ru) diag(s) (V rv)^T with the K x K core ru diag(s) rv^T folded into the
    shorter factor: a K x K x K product instead of the longer side's m x K x K one (a
    3072 x 768 layer at K = 768 makes 2 K^3 of these flops instead of 5 K^3)."""
    core = (ru * s.unsqueeze(-2)) @ rv.mT
    ones = torch.ones_like(s)
    if u.shape[-2] >= v.shape[-2]:
        return LowRank(u, ones, v @ core.mT)
    return LowRank(u @ core, ones, v)

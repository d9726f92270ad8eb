"""TSV-Merge (Gargiulo et al., CVPR 2025)."""
import torch

from .. import primitives as P
from . import LowRank, register


def concat_tasks(x: torch.Tensor) -> torch.Tensor:
    """[L, T, m, k] -> [L, m, T*k]: the task panels side by side, [X_1 ... X_T]."""
    L, T, m, k = x.shape
    return x.permute(0, 2, 1, 3).reshape(L, m, T * k)


def sti(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, gram=P.gram) -> torch.Tensor:
    """Singular Task Interference ||(U^T U - I) diag(s) (V^T V - I)||_1 per layer: [L]."""
    eye = torch.eye(u.shape[-1], dtype=torch.float32, device=u.device)
    gu, gv = gram(u) - eye, gram(v) - eye
    return (gu * s.float().unsqueeze(-2) @ gv).abs().sum((-2, -1))


@register("tsv", spectral=True, options=("orthogonalize", "k", "report_sti"))
def tsv(base, tau, *, path, k=None, backend=None, svd=None, orthogonalize="procrustes",
        report_sti=True, **_):
    """TSV-M: top-k SVD per task, orthogonalise the concatenated factors, rebuild."""
    if path != "spectral":
        return tau.mean(1), {}
    if svd is None:
        svd = backend.task_svd(tau, None, k)
    u, s, v = concat_tasks(svd.u), svd.s.flatten(1), concat_tasks(svd.v)
    stats = {"energy": svd.energy}
    if report_sti:
        stats["sti"] = sti(u, s, v, backend.gram)
    kk = svd.s.shape[-1]
    return LowRank(backend.orthogonalize(u, orthogonalize, kk), s, backend.orthogonalize(v, orthogonalize, kk)), stats

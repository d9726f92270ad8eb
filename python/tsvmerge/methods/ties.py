import torch

from ..options import Option, fraction
from . import register


@register("ties", options=(Option("density", fraction, 0.2, "fraction of each task's entries kept"),))
def ties(base, tau, *, density: float, **_):
    """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean; scaled by alpha.

    Trimming keeps each task's top `density` fraction of entries by magnitude per tensor
    (as mergekit does), since a merge streams one tensor group at a time.
    """
    flat = tau.reshape(*tau.shape[:2], -1)                        # [L, T, N]; a scalar is N = 1
    keep = max(1, round(density * flat.shape[-1]))
    if keep < flat.shape[-1]:
        threshold = flat.abs().kthvalue(flat.shape[-1] - keep + 1, dim=-1, keepdim=True).values
        flat = torch.where(flat.abs() >= threshold, flat, torch.zeros((), dtype=flat.dtype))
    sign = torch.sign(flat.sum(1, keepdim=True))                 # elected sign per entry
    agree = (torch.sign(flat) == sign) & (flat != 0)
    total = torch.where(agree, flat, torch.zeros((), dtype=flat.dtype)).sum(1)
    count = agree.sum(1).clamp_min(1)
    return (total / count).reshape(tau.shape[:1] + tau.shape[2:]), {}

import torch

from ..options import Option, fraction
from . import register
from .dare import dare_option

DENSITY = Option("density", fraction, 0.2, "fraction of each task's entries kept")


@register("ties", options=(DENSITY,))
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


@register("dare_ties", options=(DENSITY, dare_option(0.9)))
def dare_ties(base, tau, *, density: float, **_):
    """DARE then TIES (Yu et al. 2024): tau_i dropped at random and rescaled, then trimmed, elected, merged.

    As the paper and FusionBench (DARE, then the whole of TIES); mergekit's dare_ties skips the
    trim (`density=1` here).
    """
    return ties(base, tau, density=density)

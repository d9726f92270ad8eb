"""Consensus merging (Wang et al., ICML 2024, "Localizing Task Information for Improved Model
Merging and Compression"), data-free: TALL masks from the task vectors alone.

Task t's TALL mask keeps the entries where it matters more than the others together,
m_t = |tau_t| >= tall_lambda * |tau_MTL - tau_t| with tau_MTL = sum_t tau_t (the paper's
equation; FusionBench's `>` differs only where both sides are 0, where tau_t = 0 anyway).
The consensus mask keeps the entries at least `consensus_min` tasks find relevant
(2 drops both the "catastrophic" entries no task needs and the "selfish" ones only one needs).
"""
import math

import torch

from ..options import Option, non_negative_int
from . import METHODS, register
from .tsv import tsv


def non_negative_float(x) -> float:
    value = float(x)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError("expected a finite number >= 0")
    return value


CONSENSUS = (
    Option("tall_lambda", non_negative_float, 0.6, "TALL mask threshold lambda: task t keeps entries with "
           "|tau_t| >= lambda |sum_s tau_s - tau_t|"),
    Option("consensus_min", non_negative_int, 2, "keep entries that at least this many tasks' TALL masks keep"),
)


def consensus_mask(tau: torch.Tensor, tall_lambda: float, consensus_min: int) -> torch.Tensor:
    """tau [L, T, *shape] -> the consensus mask [L, 1, *shape] (bool); a task at a time, so the
    work buffers are one task's size."""
    mtl = tau.sum(1, keepdim=True)
    votes = torch.zeros(mtl.shape, dtype=torch.int32, device=tau.device)
    for t in range(tau.shape[1]):
        task = tau[:, t:t + 1]
        votes += task.abs() >= tall_lambda * (mtl - task).abs()
    return votes >= consensus_min


@register("consensus_ta", options=CONSENSUS)
def consensus_ta(base, tau, *, tall_lambda, consensus_min, **_):
    """Consensus Task Arithmetic (Wang et al. 2024): the task-arithmetic sum on the consensus mask's entries."""
    keep = consensus_mask(tau, tall_lambda, consensus_min)
    return torch.where(keep[:, 0], tau.sum(1), torch.zeros((), dtype=tau.dtype)), {}


@register("consensus_tsv", spectral=True, dense=True, options=METHODS["tsv"].options + CONSENSUS)
def consensus_tsv(base, tau, *, tall_lambda, consensus_min, **options):
    """Consensus TSV-M: the task vectors masked by the consensus mask, then TSV-M."""
    keep = consensus_mask(tau, tall_lambda, consensus_min)
    return tsv(base, tau * keep, **options)

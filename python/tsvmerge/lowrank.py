"""Low-rank task vectors (DESIGN sections 2 and 8): the rule that keeps null directions out of
a merge, and exact SVDs of factored matrices (LoRA adapters) without forming them.
"""
from __future__ import annotations

import dataclasses

import torch

from .backends import TaskSVD


def rank_tolerance(s: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """max(m, n) eps s_1 in s's dtype (the dtype the SVD ran in): singular values at or below
    it are rounding, not directions of the matrix. s [..., k] descending -> [..., 1]."""
    return s[..., :1] * (max(m, n) * torch.finfo(s.dtype).eps)


def drop_null_directions(svd: TaskSVD) -> TaskSVD:
    """Each task keeps min(k, rank(tau)) triplets: the rest (s at rounding level, or the zero
    padding of a task stored at a lower rank) are an arbitrary completion that the polar factor
    would mix into every other column. Dropped triplets become zero columns and s = 0, and the
    width shrinks to the most any task keeps. A batch where every task keeps all k comes back
    as it is (the same tensors: full-rank merges do not change by a bit)."""
    m, n = svd.u.shape[-2], svd.v.shape[-2]
    keep = svd.s > rank_tolerance(svd.s, m, n)
    if bool(keep.all()):
        return svd
    width = max(1, int(keep.sum(-1).max()))       # s is descending: the kept triplets come first
    keep = keep[..., :width]
    mask = keep.to(svd.s.dtype)
    return dataclasses.replace(svd, u=svd.u[..., :width] * mask.unsqueeze(-2), s=svd.s[..., :width] * mask,
                               v=svd.v[..., :width] * mask.unsqueeze(-2))


def svd_of_product(left: torch.Tensor, scale: torch.Tensor, right: torch.Tensor):
    """The exact thin SVD of tau = left diag(scale) right^T, left [..., m, r], scale [..., r],
    right [..., n, r], without forming tau: thin QRs left = Q_l R_l and right = Q_r R_r, then the
    SVD of the small core R_l diag(scale) R_r^T = W S Z^T gives tau = (Q_l W) S (Q_r Z)^T, in
    O((m + n) r^2). Returns (u [..., m, c], s [..., c], v [..., n, c]), c = min(m, n, r), s
    descending; zero columns of the factors give s = 0."""
    ql, rl = torch.linalg.qr(left)
    qr_, rr = torch.linalg.qr(right)
    w, s, zh = torch.linalg.svd((rl * scale.unsqueeze(-2)) @ rr.mT, full_matrices=False)
    return ql @ w, s, qr_ @ zh.mT

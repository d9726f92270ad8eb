"""The oracle: exact SVD with torch.linalg, any device."""
from __future__ import annotations

import torch

from .base import Backend, TaskSVD


def exact_task_svd(finetuned, base, k, dtype) -> TaskSVD:
    """Top-k of the full SVD of every tau = theta_i - theta_0 (half precisions factorise in
    fp32: LAPACK has no bf16/fp16 SVD)."""
    dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    tau = finetuned.to(dtype) if base is None else finetuned.to(dtype) - base.to(dtype).unsqueeze(1)
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    energy = torch.ones(s.shape[:-1], dtype=torch.float64)
    return TaskSVD(u[..., :k], s[..., :k], vh[..., :k, :].transpose(-1, -2), energy)


class ReferenceBackend(Backend):
    name = "reference"

    def task_svd(self, finetuned, base, k):
        return exact_task_svd(finetuned, base, k, self.compute_dtype)

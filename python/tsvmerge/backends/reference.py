"""The oracle: exact SVD with torch.linalg, any device."""
from __future__ import annotations

import torch

from .base import Backend, TaskSVD


class ReferenceBackend(Backend):
    name = "reference"

    def task_svd(self, finetuned, base, k):
        tau = finetuned.to(self.compute_dtype) - base.to(self.compute_dtype).unsqueeze(1)
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        energy = torch.ones(s.shape[:-1], dtype=torch.float64)
        return TaskSVD(u[..., :k], s[..., :k], vh[..., :k, :].transpose(-1, -2), energy)

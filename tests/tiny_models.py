"""Tiny Hugging Face models for the integration tests, built offline from configs.

Fine-tunes add task vectors with a spectral gap at k = floor(r / T) to every matrix (the
zoos on which a weight-agreement target is defined, DESIGN.md section 6) and small dense
noise to every other tensor.
"""
import os
import subprocess
import sys

import torch

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def gapped_delta(shape, tasks: int, gen: torch.Generator, scale: float = 0.05) -> torch.Tensor:
    """A task vector: for a matrix, k = floor(r / T) singular values in [0.5, 1] * scale, the rest
    1e-3 * scale; for any other tensor, dense noise."""
    if len(shape) != 2:
        return scale * torch.randn(shape, generator=gen)
    m, n = shape
    r = min(m, n)
    k = max(1, r // tasks)
    u = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]
    s = torch.cat([torch.linspace(1.0, 0.5, k, dtype=torch.float64), torch.full((r - k,), 1e-3, dtype=torch.float64)])
    return ((u * (scale * s)) @ v.T).float()


def save_family(model_cls, config, folder, tasks: int, seed: int) -> tuple:
    """Save a random base and `tasks` fine-tunes under `folder`; returns (base path, [paths])."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = model_cls(config)
    base_path = os.path.join(folder, "base")
    base.save_pretrained(base_path)
    state = base.state_dict()
    paths = []
    for t in range(tasks):
        model = model_cls(config)
        model.load_state_dict({n: v + gapped_delta(v.shape, tasks, gen) if v.is_floating_point() else v
                               for n, v in state.items()})
        paths.append(os.path.join(folder, f"task{t}"))
        model.save_pretrained(paths[-1])
    return base_path, paths


def run_tool(args, cwd) -> subprocess.CompletedProcess:
    """Run a console script of this environment offline; fail with its output when it fails."""
    exe = os.path.join(os.path.dirname(sys.executable), args[0])
    proc = subprocess.run([exe, *args[1:]], cwd=cwd, env={**os.environ, **OFFLINE}, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def relative_update_error(out: dict, ref: dict, base: dict) -> float:
    """max over tensors of ||out - ref|| / ||ref - base||: the error relative to the merged update."""
    worst = 0.0
    for name, r in ref.items():
        if not r.is_floating_point():
            continue
        update = (r.double() - base[name].double()).norm()
        if update > 0:
            worst = max(worst, float((out[name].double() - r.double()).norm() / update))
    return worst

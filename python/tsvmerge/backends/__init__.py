"""Backend registry. `auto` picks the fastest available; results say which ran."""
from __future__ import annotations

import importlib

import torch

from .base import Backend, TaskSVD

# name -> (module, class); fast backends import lazily so a CPU install never needs Triton.
_REGISTRY = {
    "reference": ("tsvmerge.backends.reference", "ReferenceBackend"),
    "torch": ("tsvmerge.backends.randomized", "TorchBackend"),
    "triton": ("tsvmerge.backends.triton", "TritonBackend"),
    "cuda": ("tsvmerge.backends.cuda", "CudaBackend"),
}
BACKENDS = tuple(_REGISTRY) + ("auto",)


def available(name: str, device: torch.device) -> bool:
    """Whether backend `name` can run on `device` in this install."""
    if name in ("reference", "torch"):
        return True
    if device.type != "cuda":
        return False
    try:
        cls = _load(name)
    except ImportError:
        return False
    return bool(getattr(cls, "is_available", lambda: True)())


def _load(name: str):
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def backend_class(name: str = "auto", device: str | torch.device = "cpu") -> type[Backend]:
    """The class `get_backend` builds; `auto` is cuda > triton > torch on a GPU and torch on CPU."""
    device = torch.device(device)
    if name == "auto":
        name = next(b for b in ("cuda", "triton", "torch") if available(b, device))
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if not available(name, device):
        raise RuntimeError(f"backend {name!r} is not available on device {device} in this install")
    return _load(name)


def get_backend(name: str = "auto", device: str | torch.device = "cpu", **kwargs) -> Backend:
    """Build a backend; options it does not declare raise TypeError."""
    return backend_class(name, device)(device=torch.device(device), **kwargs)


def importable_options() -> dict[str, tuple]:
    """Each backend's declared options, for the backends this install can import (the command
    line offers their flags)."""
    out = {}
    for name in _REGISTRY:
        try:
            out[name] = _load(name).OPTIONS
        except ImportError:
            pass
    return out


__all__ = ["Backend", "TaskSVD", "BACKENDS", "available", "backend_class", "get_backend", "importable_options"]

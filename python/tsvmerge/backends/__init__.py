"""Backend registry. `auto` picks the fastest available; results say which ran."""
from __future__ import annotations

import importlib

import torch

from .base import Backend, TaskSVD

# name -> (module, class); fast backends import lazily so a CPU install never needs Triton.
_REGISTRY = {
    "reference": ("tsvmerge.backends.reference", "ReferenceBackend"),
    "torch": ("tsvmerge.backends.torch_backend", "TorchBackend"),
    "triton": ("tsvmerge.backends.triton", "TritonBackend"),
    "cuda": ("tsvmerge.backends.cuda", "CudaBackend"),
}
BACKENDS = tuple(_REGISTRY) + ("auto",)


def check_device(device) -> torch.device:
    """The device, or a ValueError that says how to get it: checked before any planning."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (examples: cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"device {device!r}: this torch ({torch.__version__}) is built without CUDA: install a "
                             "CUDA build of torch (https://pytorch.org/get-started/locally/) or use --device cpu")
        count = torch.cuda.device_count()
        if not count:
            raise ValueError(f"device {device!r}: torch sees no CUDA GPU (check the driver and CUDA_VISIBLE_DEVICES) "
                             "or use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: MPS is not available in this torch on this machine: use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: tsvmerge runs on cpu, cuda or mps")
    return dev


def why_unavailable(name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot run on `device` in this install, and how to get it; None if it can."""
    if name in ("reference", "torch"):
        return None
    if device.type != "cuda":
        return f"backend {name!r} runs on CUDA GPUs: pass --device cuda, or use --backend torch or reference on {device.type}"
    try:
        cls = _load(name)
    except ImportError:
        cls = None
    if cls is None or not cls.is_available():
        if name == "triton":
            return "backend 'triton' needs the triton package: pip install triton"
        return ("backend 'cuda' needs tsvmerge's CUDA extension (built when CMake finds a CUDA compiler) or CuPy to "
                "compile the kernels at run time: pip install 'tsvmerge[gpu]'")
    return None


def available(name: str, device: torch.device) -> bool:
    """Whether backend `name` can run on `device` in this install."""
    return why_unavailable(name, device) is None


def _load(name: str):
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def backend_class(name: str = "auto", device: str | torch.device = "cpu") -> type[Backend]:
    """The class `get_backend` builds; `auto` is cuda > triton > torch on a GPU and torch on CPU.
    A device or backend that cannot run here is a ValueError that says how to get it."""
    device = check_device(device)
    if name == "auto":
        name = next(b for b in ("cuda", "triton", "torch") if available(b, device))
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if not available(name, device):
        raise ValueError(why_unavailable(name, device))
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

"""Let PyPI's torchvision import beside the CPU build of torch, without its compiled ops.

PyPI's torchvision wheel is linked against the CUDA build of torch, so beside the CPU build
its `_C` library fails to load. torchvision tolerates that everywhere except two fake-kernel
registrations (`nms`, `qnms`) that assume the ops exist: its import then fails with
"operator torchvision::nms does not exist", and so does transformers, which imports it
when it is installed. Declaring those two schemas (no kernels) lets the pure-Python parts
import: transforms, datasets and models, which is all open_clip needs. torchvision's own ops
(nms, roi_align, ...) still raise their "Couldn't load custom C++ ops" error. Where the `_C`
library loads (a matching build), nothing is declared.

`install()` defers the work to just before torchvision's first import, so a process that
never imports it pays nothing. conftest.py installs it in the test process, and
startup/sitecustomize.py in every Python the tests start.
"""
import importlib.machinery
import importlib.util
import os
import sys

_declared = []  # the torch.library.Library that holds the schemas; it must stay alive


def _declare_missing_ops() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    import torch

    folder = os.path.dirname(spec.origin)
    # `_C` until torchvision 0.28, `_C_stable` from 0.29
    libs = [os.path.join(folder, name + s) for name in ("_C", "_C_stable") for s in importlib.machinery.EXTENSION_SUFFIXES]
    lib = next((p for p in libs if os.path.exists(p)), None)
    try:
        if lib is None:
            raise OSError("no _C library")
        torch.ops.load_library(lib)
    except OSError:
        library = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _declared.append(library)


class _BeforeTorchvision:
    """A meta path entry that acts once, just before torchvision is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _declare_missing_ops()
        return None


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())

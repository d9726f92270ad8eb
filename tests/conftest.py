import hashlib
import os

import pytest
import torch

import torchvision_without_ops

# open_clip needs torchvision, whose PyPI build cannot load its ops beside the CPU torch: let its
# Python parts import, here and in every Python the tests start (torchvision_without_ops).
torchvision_without_ops.install()
_TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(_TESTS, "startup"), _TESTS,
                                                      os.environ.get("PYTHONPATH")) if p)

# Without a GPU, Triton kernels run in the interpreter; this must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def random_model(seed: int, shapes: dict, dtype=torch.float32) -> dict:
    """A random state dict: floating tensors ~N(0, 1), int64 buffers counting up."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(seed, dtype=torch.int64)
        else:
            out[name] = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return out


def random_zoo(seed: int, T: int, shapes: dict, dtype=torch.float32, scale=0.1):
    """Base plus T fine-tunes whose task vectors are dense random (no zeros anywhere)."""
    base = random_model(seed, shapes, dtype)
    tasks = []
    for t in range(T):
        delta = random_model(seed * 1000 + t + 1, shapes, torch.float64)
        tasks.append({k: (base[k].double() + scale * delta[k]).to(dtype) if base[k].is_floating_point() else base[k].clone()
                      for k in base})
    return base, tasks


def cli_zoo(folder, seed: int, tasks: int = 3) -> tuple[str, list[str]]:
    """A one-block zoo written by `tsvmerge zoo` into `folder`: (base path, task paths)."""
    from tsvmerge.cli import main
    assert main(["zoo", str(folder), "--tasks", str(tasks), "--layers", "1", "--seed", str(seed % 1000)]) == 0
    names = sorted(f for f in os.listdir(folder) if f.startswith("task_"))
    return os.path.join(folder, "base.safetensors"), [os.path.join(folder, f) for f in names]


ODD_SHAPES = {
    "blocks.0.attn.weight": (37, 23),
    "blocks.0.mlp.weight": (64, 48),
    "blocks.1.attn.weight": (37, 23),
    "blocks.1.mlp.weight": (64, 48),
    "blocks.0.attn.bias": (37,),
    "norm.weight": (23,),
    "conv.weight": (5, 3, 2, 2),
    "text_projection": (23, 17),
    "bn.num_batches_tracked": (),
}


@pytest.fixture
def seed(request):
    """A seed per test, from a stable hash of its id: inputs differ between tests, and a
    failure replays (`hash()` is salted per process)."""
    return int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:4], "little") % (2**31)

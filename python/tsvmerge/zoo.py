"""Synthetic model zoos: a base checkpoint and T fine-tunes with realistic task-vector spectra.

The README demo, the tests and the benchmarks all merge these. Tensor names and shapes are
those of open_clip's visual encoder (`visual.*` keys of a CLIP state dict), so a zoo
exercises the same shape groups as the paper's ViT-B-32 / B-16 / L-14 checkpoints.

Every tensor is drawn from its own generator, seeded from (seed, tensor name, role), so a
zoo does not depend on generation order, in-memory and on-disk zoos are identical, and a
zoo with fewer layers holds exactly the first blocks of the full one.

No integer buffer is generated: open_clip's visual encoder has none (its only buffer, the
text tower's `attn_mask`, is not persistent), and an invented one would make the zoo
disagree with real checkpoints. Tests of the copy path add their own int tensor.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .backends.lapack import serial_lapack
from .io import TensorInfo, claim, publishing
from .io.safetensors import SafetensorsWriter
from .primitives import named_generator


@dataclass(frozen=True)
class Arch:
    """An open_clip VisionTransformer config (the fields a state dict's shapes depend on)."""
    name: str
    width: int
    layers: int
    patch: int
    image: int
    output_dim: int
    mlp_ratio: int = 4


ARCHS = {
    "ViT-B-32": Arch("ViT-B-32", width=768, layers=12, patch=32, image=224, output_dim=512),
    "ViT-B-16": Arch("ViT-B-16", width=768, layers=12, patch=16, image=224, output_dim=512),
    "ViT-L-14": Arch("ViT-L-14", width=1024, layers=24, patch=14, image=224, output_dim=768),
}

SPECTRA = ("powerlaw", "gapped", "flatfloor", "geometric")

# Scale of a task vector: entry RMS of every delta, relative to base weights of RMS 0.02.
DELTA_RMS = 1e-3
BASE_STD = 0.02
# powerlaw: head rank cap, decay exponent and the head's share of a matrix's energy.
HEAD_RANK = 128
POWER = 1.0
HEAD_ENERGY = 0.9
# gapped: sigma_k over the floor's top singular value (>= 10 is the promise; margin for noise).
GAP = 30.0
# flatfloor: a short head of strong shared directions over an iid floor that holds half the energy,
# so k = r/T lies deep in a floor that decays slowly (the randomized SVD's hardest case).
FLAT_HEAD_RANK = 32
FLAT_HEAD_ENERGY = 0.5
# geometric: sigma_j = GEOMETRIC ** j over the whole rank, no floor.
GEOMETRIC = 0.98
# Weight of the subspace shared by all tasks in each task's factors (0: independent tasks).
SHARED = 0.5


def _arch(arch: str | Arch) -> Arch:
    if isinstance(arch, Arch):
        return arch
    try:
        return ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}") from None


def model_shapes(arch: str | Arch = "ViT-B-32", layers: int | None = None) -> dict[str, tuple]:
    """Names and shapes of the visual encoder's state dict, in open_clip's order."""
    a = _arch(arch)
    w, blocks = a.width, a.layers if layers is None else int(layers)
    grid = a.image // a.patch
    shapes = {
        "visual.class_embedding": (w,),
        "visual.positional_embedding": (grid * grid + 1, w),
        "visual.proj": (w, a.output_dim),
        "visual.conv1.weight": (w, 3, a.patch, a.patch),
        "visual.ln_pre.weight": (w,),
        "visual.ln_pre.bias": (w,),
    }
    hidden = a.mlp_ratio * w
    for i in range(blocks):
        p = f"visual.transformer.resblocks.{i}."
        shapes.update({
            p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
            p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
            p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
            p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
            p + "mlp.c_fc.weight": (hidden, w), p + "mlp.c_fc.bias": (hidden,),
            p + "mlp.c_proj.weight": (w, hidden), p + "mlp.c_proj.bias": (w,),
        })
    shapes["visual.ln_post.weight"] = (w,)
    shapes["visual.ln_post.bias"] = (w,)
    return shapes


@dataclass
class Zoo:
    """Paths of a zoo written by `make_zoo`."""
    base: str
    finetuned: list[str] = field(default_factory=list)
    arch: str = "ViT-B-32"
    tasks: int = 0


def _base_tensor(name: str, shape: tuple, seed: int) -> torch.Tensor:
    """An initialised ViT: LayerNorm weight 1 and bias 0, biases 0, everything else N(0, 0.02)."""
    if ".ln_" in name:
        return torch.ones(shape) if name.endswith(".weight") else torch.zeros(shape)
    if name.endswith("bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=named_generator(seed, name, "base")) * BASE_STD


def _orthonormal_factor(shared: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Orthonormal columns mixing the tasks' shared directions with the task's own."""
    own = torch.randn(shared.shape, generator=gen)
    with serial_lapack():  # a thread per core stalls this small QR ~50x when another job holds a core
        return torch.linalg.qr(math.sqrt(SHARED) * shared + math.sqrt(1 - SHARED) * own)[0]


def _head(spectrum: str, m: int, n: int, tasks: int) -> tuple[torch.Tensor, float]:
    """Singular values of a task matrix's strong part and the iid floor's entry std."""
    r, energy = min(m, n), DELTA_RMS ** 2 * m * n
    if spectrum in ("powerlaw", "flatfloor"):
        # k = r/T lands in the floor or the flat tail of the head, as in real fine-tunes (DESIGN 6).
        rank, share = (HEAD_RANK, HEAD_ENERGY) if spectrum == "powerlaw" else (FLAT_HEAD_RANK, FLAT_HEAD_ENERGY)
        sigma = torch.arange(1, min(r, rank) + 1, dtype=torch.float32) ** -POWER
        sigma *= math.sqrt(share * energy / float((sigma ** 2).sum()))
        return sigma, DELTA_RMS * math.sqrt(1 - share)
    if spectrum == "geometric":
        sigma = GEOMETRIC ** torch.arange(r, dtype=torch.float32)
        return sigma * math.sqrt(energy / float((sigma ** 2).sum())), 0.0
    # gapped: exactly k = r // T strong components, gently decaying (distinct, so the top-k
    # vectors are well conditioned), over a floor whose top singular value ~ std (sqrt m + sqrt n)
    # sits GAP times below sigma_k.
    k = r // tasks
    sigma = torch.logspace(0, math.log10(0.5), k) if k else torch.zeros(0)
    sigma *= math.sqrt(energy / max(float((sigma ** 2).sum()), 1e-30))
    floor = float(sigma[-1]) / GAP / (math.sqrt(m) + math.sqrt(n)) if k else DELTA_RMS
    return sigma, floor


def _task_deltas(name: str, shape: tuple, tasks: int, seed: int, spectrum: str) -> Iterator[torch.Tensor]:
    """The T task vectors of one tensor, one at a time (fp32)."""
    if len(shape) != 2:
        for t in range(tasks):
            yield torch.randn(shape, generator=named_generator(seed, name, f"task{t}")) * DELTA_RMS
        return
    m, n = shape
    sigma, floor = _head(spectrum, m, n, tasks)
    common = named_generator(seed, name, "shared")
    shared_u = torch.randn(m, len(sigma), generator=common)
    shared_v = torch.randn(n, len(sigma), generator=common)
    for t in range(tasks):
        gen = named_generator(seed, name, f"task{t}")
        strength = 0.5 + torch.rand((), generator=gen).item()  # tasks differ in how far they move
        u = _orthonormal_factor(shared_u, gen)
        v = _orthonormal_factor(shared_v, gen)
        # Rank-h product plus iid noise: never a full-rank Gaussian product.
        delta = torch.randn(m, n, generator=gen).mul_(floor * strength)
        yield delta.addmm_(u * (sigma * strength), v.T)


def _check(arch, tasks, spectrum):
    if spectrum not in SPECTRA:
        raise ValueError(f"unknown spectrum {spectrum!r}; choose one of {', '.join(SPECTRA)}")
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    return _arch(arch)


def _generate(arch: Arch, tasks: int, layers, seed: int, spectrum: str):
    """Yield (name, base fp32, iterator over the T fine-tuned fp32 tensors), tensor by tensor."""
    for name, shape in model_shapes(arch, layers).items():
        base = _base_tensor(name, shape, seed)
        yield name, base, (d.add_(base) for d in _task_deltas(name, shape, tasks, seed, spectrum))


def make_zoo_dicts(arch: str | Arch = "ViT-B-32", tasks: int = 8, layers: int | None = None, seed: int = 0,
                   spectrum: str = "powerlaw", dtype: torch.dtype = torch.float32):
    """A small zoo in memory: (base state dict, [fine-tuned state dicts])."""
    a = _check(arch, tasks, spectrum)
    base, finetuned = {}, [{} for _ in range(tasks)]
    for name, b, fts in _generate(a, tasks, layers, seed, spectrum):
        base[name] = b.to(dtype)
        for sd, ft in zip(finetuned, fts):
            sd[name] = ft.to(dtype)
    return base, finetuned


def make_zoo(folder: str, arch: str | Arch = "ViT-B-32", tasks: int = 8, layers: int | None = None,
             seed: int = 0, dtype: torch.dtype = torch.float32, spectrum: str = "powerlaw",
             progress: bool | None = None, overwrite: bool = False) -> Zoo:
    """Write `base.safetensors` and `task_01.safetensors`... into `folder`, tensor by tensor.

    Memory stays at a few tensors whatever the model size; `progress`: a bar (None: only on a
    terminal). The folder is published whole when
    every file is written (an existing one is replaced only with `overwrite`, an empty one
    excepted); a failed run leaves nothing.
    """
    a = _check(arch, tasks, spectrum)
    target = claim(folder, folder=True, overwrite=overwrite)
    shapes = model_shapes(a, layers)
    infos = {name: TensorInfo(shape, dtype) for name, shape in shapes.items()}
    names = ["base.safetensors"] + [f"task_{t + 1:02d}.safetensors" for t in range(tasks)]
    zoo = Zoo(os.path.join(folder, names[0]), [os.path.join(folder, n) for n in names[1:]], a.name, tasks)
    about = {"format": "pt", "generator": "tsvmerge.zoo", "arch": a.name, "layers": str(a.layers if layers is None else layers),
             "spectrum": spectrum, "seed": str(seed), "tasks": str(tasks)}
    with publishing(target) as (tmp,):
        writers = []
        try:
            for i, name in enumerate(names):
                writers.append(SafetensorsWriter(os.path.join(tmp, name), infos, {**about, "task": str(i)}))
            total = sum(info.nbytes for info in infos.values()) * len(writers)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"zoo {a.name} x{tasks}",
                      dynamic_ncols=True, disable=None if progress is None else not progress) as bar:
                for name, base, fts in _generate(a, tasks, layers, seed, spectrum):
                    for writer, tensor in zip(writers, [base, *fts]):
                        writer.write(name, tensor.to(dtype))
                        bar.update(infos[name].nbytes)
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        for writer in writers:
            writer.close()
    return zoo

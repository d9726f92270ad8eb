"""Plan a merge from headers alone: validate inputs, classify tensors, group and batch them.

Everything that can be wrong with the inputs is found here, before any compute, with an
error that names the file and the tensor.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch

from .io import Checkpoint, InputError, TensorInfo
from .options import fraction, positive_int

# spectral: per-task SVDs; dense: an elementwise update (the mean, for tsv); copy: the base as it is
SPECTRAL, DENSE, COPY = "spectral", "dense", "copy"
CLIP_PRESET = ("text_projection",)
DEFAULT_BATCH_BYTES = 1 << 30
# Layers of one spectral batch at most, so that a merge splits evenly across processes
# (`split_by_cost`), whose batches are the single process's (so the same bits come out).
# Measured on ViT-B-32 x 8, 12 blocks, in memory, 2 threads: 6 merges as fast as no cap
# (34.2 s against 33.3-34.5 s), 3 was 9-24% slower; 6 splits it over 2 ranks to 0.995.
SPECTRAL_BATCH_LAYERS = 6


@dataclass
class TensorPlan:
    name: str
    info: TensorInfo        # the base's shape and dtype (the output keeps them)
    path: str               # spectral | dense | copy
    k: int = 0              # per-task rank on the spectral path
    note: str = ""


@dataclass
class Batch:
    """Tensors of one path, shape and rank, computed together as [L, T, *shape]."""
    path: str
    shape: tuple
    names: list = field(default_factory=list)
    k: int = 0


@dataclass
class MergePlan:
    base: Checkpoint
    tasks: list
    tensors: dict           # name -> TensorPlan, in the base's order
    batches: list
    batch_bytes: int = DEFAULT_BATCH_BYTES


def is_excluded(name: str, patterns) -> bool:
    """A pattern with wildcards is a glob over the whole name; otherwise a substring."""
    return any(fnmatch.fnmatchcase(name, p) if any(c in p for c in "*?[") else p in name for p in patterns)


def validate(base: Checkpoint, tasks: list) -> dict[str, TensorInfo]:
    """Check that every task has exactly the base's tensors with the same shapes."""
    if not tasks:
        raise InputError(None, None, "no fine-tuned checkpoints given: pass at least one")
    ref = base.infos()
    if not ref:
        raise InputError(base.source, None, "holds no tensors")
    for task in tasks:
        infos = task.infos()
        for name in ref:
            if name not in infos:
                raise InputError(task.source, name, f"missing (the base {base.source} has it)")
        for name, info in infos.items():
            if name not in ref:
                raise InputError(task.source, name, f"not in the base {base.source}")
            if info.shape != ref[name].shape:
                raise InputError(task.source, name, f"shape {list(info.shape)} differs from the base's {list(ref[name].shape)}")
            if ref[name].dtype.is_floating_point and not info.dtype.is_floating_point:
                raise InputError(task.source, name, f"dtype {info.dtype} is not floating point like the base's {ref[name].dtype}")
    return ref


@dataclass(frozen=True)
class EnergyBudget:
    """k = "energy:F": each task, per tensor, keeps the smallest rank that holds a share F of
    its spectral energy (sum s^2), the ranks shrunk in proportion where they add up to more
    than r = min(m, n) (`methods.tsv.energy_ranks`)."""
    share: float

    def __str__(self) -> str:
        return f"energy:{self.share:g}"


def rank_budget(x) -> int | EnergyBudget:
    """TSV-M's `k`: a whole number >= 1, or "energy:F" with F in (0, 1]."""
    text = x.strip().lower() if isinstance(x, str) else ""
    try:
        return EnergyBudget(fraction(text[len("energy:"):])) if text.startswith("energy:") else positive_int(x)
    except (TypeError, ValueError, OverflowError):
        raise ValueError("expected a whole number >= 1 or 'energy:F' with F in (0, 1] (e.g. energy:0.95)") from None


def merge_rank(shape, T: int, k: int | EnergyBudget | None = None) -> tuple[int, str]:
    """TSV-M's budget: k = floor(r / T) by default, or a given k with T*k <= r; an energy
    budget loads all r triplets of each task and chooses its ranks from them. k = 0 (r < T)
    sends the tensor down the dense path, with a note saying why."""
    r = min(shape)
    if isinstance(k, EnergyBudget):
        return merge_rank(shape, T) if r < T else (r, "")
    if k is not None and k * T > r:
        raise ValueError(f"k={k} for {T} tasks needs T*k <= min(m, n) = {r} for shape {list(shape)}")
    rank = r // T if k is None else k
    return rank, "" if rank else f"r={r} < T={T} gives k=0: dense path instead"


def full_rank(shape, T: int, k=None) -> tuple[int, str]:
    """Every triplet of each task (the Iso methods work on whole task matrices)."""
    r = min(shape)
    return r, "" if r else "empty matrix: dense path"


def classify(name: str, info: TensorInfo, *, spectral_rank, exclude) -> TensorPlan:
    """copy (not floating), spectral (2-D, not excluded, a rank >= 1) or dense."""
    if not info.dtype.is_floating_point:
        return TensorPlan(name, info, COPY)
    if spectral_rank is None or len(info.shape) != 2 or is_excluded(name, exclude):
        return TensorPlan(name, info, DENSE)
    rank, note = spectral_rank(info.shape)
    return TensorPlan(name, info, SPECTRAL, k=rank) if rank else TensorPlan(name, info, DENSE, note=note)


def batch_nbytes(batch: Batch, T: int) -> int:
    """fp32 bytes a loaded batch holds: L layers x (T tasks + base), or the base alone."""
    return 4 * TensorInfo(batch.shape, torch.float32).numel * len(batch.names) * ((T + 1) if batch.path != COPY else 1)


def plan_groups(tensors: dict, T: int, batch_bytes: int = DEFAULT_BATCH_BYTES) -> list[Batch]:
    """Group tensors by (path, shape, rank) and cut each group into batches within the memory
    budget. A batch holds L layers x (T tasks + base) in fp32 (`batch_nbytes`); a single layer
    always fits; a spectral batch holds at most SPECTRAL_BATCH_LAYERS.
    """
    groups: dict = {}
    for p in tensors.values():
        groups.setdefault((p.path, p.info.shape, p.k), []).append(p.name)
    batches = []
    for (path, shape, k), names in groups.items():
        per_layer = batch_nbytes(Batch(path, shape, [None]), T)
        step = max(1, batch_bytes // max(per_layer, 1))
        if path == SPECTRAL:
            step = min(step, SPECTRAL_BATCH_LAYERS)
        for i in range(0, len(names), step):
            batches.append(Batch(path, shape, names[i:i + step], k))
    return batches


def plan_merge(base: Checkpoint, tasks: list, *, spectral_rank=None, exclude=(),
               batch_bytes: int = DEFAULT_BATCH_BYTES) -> MergePlan:
    """`spectral_rank(shape) -> (k, note)` assigns 2-D tensors their per-task rank (k = 0: the
    dense path, with the note); None sends every floating tensor down the dense path."""
    ref = validate(base, tasks)
    tensors = {name: classify(name, info, spectral_rank=spectral_rank, exclude=exclude) for name, info in ref.items()}
    return MergePlan(base, tasks, tensors, plan_groups(tensors, len(tasks), batch_bytes), batch_bytes)


# The cost model that splits a merge across processes: seconds ~ bytes / BYTES_PER_S +
# flops / FLOPS_PER_S, fitted to per-tensor times of ViT-B-32 x 8 on the torch backend (see
# README, "Merges across processes"). Only the ratios between tensors matter.
BYTES_PER_S = 1e9
FLOPS_PER_S = 2e10
PASSES = 6      # passes over a task matrix at the default energy target (5-6 measured)
OVERSAMPLE = 10


def tensor_work(tp: TensorPlan, T: int) -> tuple[int, int]:
    """(bytes, flops) of merging one tensor: its bytes read (base and T tasks, as fp32) and
    written, and on the spectral path the task SVDs' flops (2 m n c per pass per task,
    c = k + 10) and the orthogonalisation's over the K = T k concatenated columns (4 max(m, n)
    K^2 for the Grams and products, 20 K^3 for the K x K eigensolves: fitted, they are slower
    per flop)."""
    n_bytes = 4 * tp.info.numel * ((T + 2) if tp.path != COPY else 2)
    flops = 0
    if tp.path == SPECTRAL:
        m, n = tp.info.shape
        c, K = min(tp.k + OVERSAMPLE, m, n), min(T * tp.k, m, n)
        flops = T * 2 * m * n * c * PASSES + 4 * max(m, n) * K * K + 20 * K ** 3
    elif tp.path == DENSE:
        flops = 2 * T * tp.info.numel
    return n_bytes, flops


def tensor_cost(tp: TensorPlan, T: int) -> float:
    """Estimated seconds to merge one tensor (`tensor_work` at BYTES_PER_S and FLOPS_PER_S)."""
    n_bytes, flops = tensor_work(tp, T)
    return n_bytes / BYTES_PER_S + flops / FLOPS_PER_S


def split_by_cost(plan: MergePlan, batches: list, parts: int) -> list[list[Batch]]:
    """`batches` in `parts` shares of about equal cost (`tensor_cost`): the costliest first,
    each to the share with the least so far (ties to the lower share), each share in plan order.
    Whole batches, so that every tensor is computed in the batch a single process computes it
    in: the same operands, the same bits. The same on every process, from headers alone."""
    T = len(plan.tasks)
    cost = [sum(tensor_cost(plan.tensors[n], T) for n in b.names) for b in batches]
    loads, shares = [0.0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(batches)), key=lambda i: -cost[i]):     # stable: ties keep plan order
        j = min(range(parts), key=lambda j: (loads[j], j))
        loads[j] += cost[i]
        shares[j].append(i)
    return [[batches[i] for i in sorted(share)] for share in shares]


def share_of(plan: MergePlan, batches: list) -> MergePlan:
    """The plan of `batches` only."""
    tensors = {n: plan.tensors[n] for b in batches for n in b.names}
    return MergePlan(plan.base, plan.tasks, tensors, list(batches), plan.batch_bytes)

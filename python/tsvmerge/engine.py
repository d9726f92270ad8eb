"""The merge loop: load batch g+1 while batch g computes, write each result as it is made.

Peak memory is two batches (the one computing, the one loading) plus work buffers, never
the whole zoo: see `plan.plan_groups` for the batch budget.
"""
from __future__ import annotations

import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .backends import Backend, TaskSVD
from .heap import reuse_freed_memory
from .io import InputError
from .methods import LowRank, Method
from .plan import COPY, SPECTRAL, Batch, MergePlan, batch_nbytes


@dataclass
class Loaded:
    batch: Batch
    base: torch.Tensor                 # [L, *shape]
    tau: torch.Tensor | None           # task vectors [L, T, *shape]; None on the copy path
    svd: TaskSVD | None = None         # from TSV-C factors, when every task stores enough rank
    seconds: float = 0.0


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. Both always reach the sum, so a finite sum clears t in one read
    (25x faster than isfinite().all(), which writes a mask); only a sum that overflowed or
    met one needs the elementwise test."""
    return not t.dtype.is_floating_point or bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _checked(t: torch.Tensor, source: str, name: str) -> torch.Tensor:
    if not _all_finite(t):
        raise InputError(source, name, "contains NaN or Inf values: corrupted checkpoint?")
    return t


def _stored_factors(plan: MergePlan, names: list, k: int, dtype, device) -> TaskSVD | None:
    """Stack TSV-C factors when every task stores rank >= k for every tensor of the batch."""
    tasks = plan.tasks
    if not all(t.is_delta and hasattr(t, "stored_rank") for t in tasks):
        return None
    if any(n not in t.shapes or t.stored_rank(n) < k for t in tasks for n in names):
        return None
    us, ss, vs = [], [], []
    for name in names:
        fs = [t.factors(name) for t in tasks]
        us.append(torch.stack([u[:, :k] for u, _, _ in fs]))
        ss.append(torch.stack([s[:k] for _, s, _ in fs]))
        vs.append(torch.stack([v[:, :k] for _, _, v in fs]))
    u, s, v = (torch.stack(x).to(device, dtype) for x in (us, ss, vs))
    return TaskSVD(u, s, v, torch.ones(s.shape[:-1], dtype=torch.float64))


def load_batch(plan: MergePlan, batch: Batch, dtype: torch.dtype, device) -> Loaded:
    start = time.perf_counter()
    base = torch.stack([_checked(plan.base.read(n), plan.base.source, n) for n in batch.names])
    if batch.path == COPY:
        return Loaded(batch, base, None, seconds=time.perf_counter() - start)
    base = base.to(dtype)
    svd = None
    if batch.path == SPECTRAL:
        svd = _stored_factors(plan, batch.names, batch.k, dtype, device)
    tau = None
    if svd is None:
        # tau = theta_i - theta_0 is formed in the copy into the batch buffer: no extra pass
        tau = torch.empty((len(batch.names), len(plan.tasks)) + tuple(batch.shape), dtype=dtype)
        for t, task in enumerate(plan.tasks):
            for l, name in enumerate(batch.names):
                x = _checked(task.read(name), task.source, name)
                if task.is_delta:
                    tau[l, t] = x
                else:
                    torch.sub(x.to(dtype), base[l], out=tau[l, t])
            task.release()
        tau = tau.to(device)
    plan.base.release()
    return Loaded(batch, base.to(device), tau, svd, time.perf_counter() - start)


def _task_bytes(plan: MergePlan, batch: Batch) -> int:
    """fp32 bytes of task data a batch computes on (the progress bar's unit)."""
    if batch.path == COPY:
        return 0
    return len(plan.tasks) * 4 * plan.tensors[batch.names[0]].info.numel * len(batch.names)


def iter_batches(plan: MergePlan, backend: Backend, batches: list, desc: str, progress=None):
    """Yield each batch loaded: read ahead in a background thread when the inputs are files,
    in turn when they are in memory.

    In memory, loading is CPU work (the copy that forms tau), and a reader thread competing
    with the compute threads costs more than it hides on a machine with few cores (ViT-B-32
    x 8 on 2 cores: 18.9 s in turn, 19.6 s with one batch read ahead, 20.7 s with more).
    """
    args = (backend.compute_dtype, backend.device)
    total = sum(_task_bytes(plan, b) for b in batches)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True,
               disable=(None if progress is None else not progress))
    reads_files = any(c.reads_files for c in (plan.base, *plan.tasks))
    with reuse_freed_memory():
        loads = _read_ahead(plan, batches, args) if reads_files else (load_batch(plan, b, *args) for b in batches)
        for batch, loaded in zip(batches, loads):
            yield loaded
            bar.update(_task_bytes(plan, batch))
    bar.close()


def _read_ahead(plan: MergePlan, batches: list, args):
    """Load batches in a background thread, running ahead by the next batch and by further
    ones while the batches read ahead fit in one batch budget: a small batch (biases,
    LayerNorms) between two large spectral ones would otherwise hold back the second one's
    read until the first had been computed. Peak memory stays two budgets: the batch
    computing and those read ahead."""
    sizes = [batch_nbytes(b, len(plan.tasks)) for b in batches]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = collections.deque()       # futures of batches i, i + 1, ... already submitted
        for i in range(len(batches)):
            for j in range(i + len(pending), len(batches)):
                if j > i + 1 and sum(sizes[i + 1:j + 1]) > plan.batch_bytes:
                    break
                pending.append(pool.submit(load_batch, plan, batches[j], *args))
            yield pending.popleft().result()


def run_merge(plan: MergePlan, method: Method, backend: Backend, *, alpha: float, options: dict,
              write, out_dtype=None, progress: bool | None = None) -> dict:
    """Compute every batch and hand each output tensor to `write(name, tensor)`.

    Returns per-tensor report entries. `out_dtype=None` keeps each base tensor's dtype.
    """
    entries = {}
    for loaded in iter_batches(plan, backend, plan.batches, f"merge[{method.name}]", progress):
        batch = loaded.batch
        start = time.perf_counter()
        outputs, stats = _compute(loaded, method, backend, alpha, options, out_dtype, plan)
        seconds = time.perf_counter() - start
        for l, name in enumerate(batch.names):
            write(name, outputs[l])
            entries[name] = _entry(plan.tensors[name], stats, l, seconds / len(batch.names))
    return entries


def _compute(loaded: Loaded, method, backend, alpha, options, out_dtype, plan):
    batch = loaded.batch
    dtypes = [out_dtype or plan.tensors[n].info.dtype for n in batch.names]
    if batch.path == COPY:
        return [loaded.base[l].to(dtypes[l]) for l in range(len(batch.names))], {}
    update, stats = method.fn(loaded.base, loaded.tau, path=batch.path, k=batch.k,
                              backend=backend, svd=loaded.svd, **options)
    if isinstance(update, LowRank):
        same = all(d == dtypes[0] for d in dtypes)
        out = backend.lowrank_apply(loaded.base, update.u, update.s, update.v, alpha, dtypes[0] if same else torch.float32)
        outputs = [out[l].to(dtypes[l]).cpu() for l in range(len(dtypes))]
    else:
        merged = loaded.base + alpha * update
        outputs = [merged[l].to(dtypes[l]).cpu() for l in range(len(dtypes))]
    if not all(_all_finite(o) for o in outputs):
        raise FloatingPointError(f"non-finite merged values in {batch.names[0]} (and its batch): "
                                 "please report this with the inputs' shapes")
    return outputs, stats


def _entry(tp, stats: dict, layer: int, seconds: float) -> dict:
    entry = {"path": tp.path, "shape": list(tp.info.shape), "time_s": round(seconds, 6)}
    if tp.path == SPECTRAL:
        entry["k"] = tp.k
        energy = stats.get("energy")
        if energy is not None:
            entry["energy"] = float(energy[layer].min())
        if "sti" in stats:
            entry["sti"] = float(stats["sti"][layer])
    if tp.note:
        entry["note"] = tp.note
    return entry

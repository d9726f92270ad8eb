"""The merge loop: load batch g+1 while batch g computes, write each result as it is made.

Peak memory is two batches (the one computing, the one loading) plus work buffers, never
the whole zoo: see `plan.plan_groups` for the batch budget.
"""
from __future__ import annotations

import collections
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backends import Backend, TaskSVD
from .distributed import World
from .heap import reuse_freed_memory
from .io import InputError
from .methods import LowRank, Method
from .methods.steps import apply_steps_
from .plan import COPY, SPECTRAL, Batch, MergePlan, batch_nbytes


@dataclass
class Loaded:
    batch: Batch
    base: torch.Tensor                 # [L, *shape]
    tau: torch.Tensor | None           # vectors of the tasks read dense [L, Td, *shape]; None if none is
    factored: dict | None = None       # on the spectral path, task index -> its exact SVD (u, s, v),
                                       # [L, m, r], [L, r], [L, n, r], for tasks stored as factors
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


def _stored_factors(task, names: list, k: int):
    """The task's top-min(k, r) SVD triplets of every tensor of a batch, zero-padded to one
    width, when it stores all of them as factors (TSV-C, LoRA), else None (it is read dense).
    A task of rank r < k contributes r triplets: the padding is dropped with the null
    directions (`lowrank.drop_null_directions`)."""
    if not task.is_delta:
        return None
    fs = []
    for name in names:
        f = task.factors(name)
        if f is None:
            return None
        fs.append(tuple(_checked(x, task.source, name) for x in (f[0][:, :k], f[1][:k], f[2][:, :k])))
    width = max(1, max(s.shape[0] for _, s, _ in fs))
    return tuple(torch.stack([F.pad(f[i], (0, width - f[1].shape[0])) for f in fs]) for i in range(3))


def load_batch(plan: MergePlan, batch: Batch, dtype: torch.dtype, device, factors: bool = True) -> Loaded:
    """One batch in the compute dtype on the device; tasks stored as factors stay factors on the
    spectral path when `factors`, else every task is read dense."""
    start = time.perf_counter()
    base = torch.stack([_checked(plan.base.read(n), plan.base.source, n) for n in batch.names])
    if batch.path == COPY:
        return Loaded(batch, base, None, seconds=time.perf_counter() - start)
    base = base.to(dtype)
    factored = {}
    if batch.path == SPECTRAL and factors:
        for t, task in enumerate(plan.tasks):
            f = _stored_factors(task, batch.names, batch.k)
            if f is not None:
                factored[t] = tuple(x.to(device, dtype) for x in f)
                task.release()
    dense = [t for t in range(len(plan.tasks)) if t not in factored]
    tau = None
    if dense:
        # tau = theta_i - theta_0 is formed in the copy into the batch buffer: no extra pass
        tau = torch.empty((len(batch.names), len(dense)) + tuple(batch.shape), dtype=dtype)
        for i, t in enumerate(dense):
            task = plan.tasks[t]
            for l, name in enumerate(batch.names):
                x = _checked(task.read(name), task.source, name)
                if task.is_delta:
                    tau[l, i] = x
                else:
                    torch.sub(x.to(dtype), base[l], out=tau[l, i])
            task.release()
        tau = tau.to(device)
    plan.base.release()
    return Loaded(batch, base.to(device), tau, factored or None, time.perf_counter() - start)


def task_svds(loaded: Loaded, backend: Backend) -> TaskSVD | None:
    """The task SVDs of a spectral batch with factored tasks: theirs as stored, the dense tasks'
    from the backend, in task order, zero-padded to one width. None when every task is dense
    (the method takes them from tau)."""
    if not loaded.factored:
        return None
    dense = backend.task_svd(loaded.tau, None, loaded.batch.k) if loaded.tau is not None else None
    L = loaded.base.shape[0]
    parts, energy, passes, capped, d = [], [], [], [], 0
    for t in range(len(loaded.factored) + (0 if dense is None else dense.s.shape[1])):
        if t in loaded.factored:     # stored factors: exact, no pass over a dense matrix
            parts.append(loaded.factored[t])
            energy.append(torch.ones(L, dtype=torch.float64))
            passes.append(torch.zeros(L, dtype=torch.long))
            capped.append(torch.zeros(L, dtype=torch.bool))
        else:
            parts.append((dense.u[:, d], dense.s[:, d], dense.v[:, d]))
            energy.append(None if dense.energy is None else dense.energy[:, d])
            passes.append(None if dense.passes is None else dense.passes[:, d])
            capped.append(None if dense.capped is None else dense.capped[:, d])
            d += 1
    width = max(s.shape[-1] for _, s, _ in parts)
    u, s, v = (torch.stack([F.pad(p[i], (0, width - p[1].shape[-1])) for p in parts], 1) for i in range(3))
    return TaskSVD(u, s, v, *(None if any(x is None for x in xs) else torch.stack(xs, 1) for xs in (energy, passes, capped)))


def _task_bytes(plan: MergePlan, batch: Batch) -> int:
    """fp32 bytes of task data a batch computes on (the progress bar's unit)."""
    if batch.path == COPY:
        return 0
    return len(plan.tasks) * 4 * plan.tensors[batch.names[0]].info.numel * len(batch.names)


def iter_batches(plan: MergePlan, backend: Backend, batches: list, desc: str, progress=None, factors: bool = True,
                 world: World | None = None):
    """Yield each batch loaded (`load_batch`): read ahead in a background thread when the inputs
    are files, in turn when they are in memory. The progress bar counts the whole job's
    batches (every rank's, in a distributed run: `world`).

    In memory, loading is CPU work (the copy that forms tau), and a reader thread competing
    with the compute threads costs more than it hides on a machine with few cores (ViT-B-32
    x 8 on 2 cores: 18.9 s in turn, 19.6 s with one batch read ahead, 20.7 s with more).
    """
    args = (backend.compute_dtype, backend.device, factors)
    total = sum(_task_bytes(plan, b) for b in batches)
    bar = (world or World()).progress(total, desc, progress)
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
    read until the first had been computed. Loaded batches stay within two budgets (the
    batch computing and those read ahead); the compute adds its working memory on top (task
    vectors, Krylov bases; ViT-B-32 x 8 from disk: 0.4-0.6 GB above the start at budgets of
    32-128 MiB, flat in the budget, since one 3072 x 768 layer of 9 models is 85 MiB)."""
    sizes = [batch_nbytes(b, len(plan.tasks)) for b in batches]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = collections.deque()       # futures of batches i, i + 1, ... already submitted
        for i in range(len(batches)):
            for j in range(i + len(pending), len(batches)):
                if j > i + 1 and sum(sizes[i + 1:j + 1]) > plan.batch_bytes:
                    break
                pending.append(pool.submit(load_batch, plan, batches[j], *args))
            yield pending.popleft().result()


def run_merge(plan: MergePlan, method: Method, backend: Backend, *, outputs: list, options: dict,
              out_dtype=None, progress: bool | None = None, updates: bool = False, world: World | None = None) -> dict:
    """Compute every batch's update once and hand each output tensor to the `write(name, tensor)`
    of every (alpha, write) in `outputs`: one output per alpha, each made exactly as a merge with
    that alpha alone would make it.

    Returns per-tensor report entries of the plan's batches (this rank's share, in a
    distributed run: `world` only feeds the progress bar). `out_dtype=None` keeps each base
    tensor's dtype. With `updates`, `write` gets each tensor's update alpha * Delta instead of
    the merged tensor: the factors (u [m, K], s [K], v [n, K]) of a low-rank one, a dense one,
    or None (copied).
    """
    entries = {}
    factors = not (method.dense or options.get("dare"))     # DARE and masks need every task vector dense
    for loaded in iter_batches(plan, backend, plan.batches, f"merge[{method.name}]", progress, factors, world):
        batch = loaded.batch
        start = time.perf_counter()
        apply_steps_(loaded, backend.seed, options)      # in place, once: the non-finite check re-runs the method only
        update, stats = (None, {}) if batch.path == COPY else _method_update(loaded, method, backend, options)
        for alpha, write in outputs:
            if updates:
                tensors = _scaled_update(loaded, update, alpha)
            else:
                tensors = _applied(loaded, update, method, backend, alpha, options, out_dtype, plan)
            for name, tensor in zip(batch.names, tensors):
                write(name, tensor)
        seconds = time.perf_counter() - start
        for l, name in enumerate(batch.names):
            entries[name] = _entry(plan.tensors[name], stats, l, seconds / len(batch.names))
    return entries


def _method_update(loaded: Loaded, method, backend, options):
    batch = loaded.batch
    return method.fn(loaded.base, loaded.tau, path=batch.path, k=batch.k, backend=backend,
                     svd=task_svds(loaded, backend), **options)


def _applied(loaded: Loaded, update, method, backend, alpha, options, out_dtype, plan) -> list:
    """The batch's merged tensors base + alpha * update, on the CPU in their output dtypes."""
    batch = loaded.batch
    dtypes = [out_dtype or plan.tensors[n].info.dtype for n in batch.names]
    if batch.path == COPY:
        return [loaded.base[l].to(dtypes[l]) for l in range(len(batch.names))]
    if isinstance(update, LowRank):
        same = all(d == dtypes[0] for d in dtypes)
        out = backend.lowrank_apply(loaded.base, update.u, update.s, update.v, alpha, dtypes[0] if same else torch.float32)
        outputs = [out[l].to(dtypes[l]).cpu() for l in range(len(dtypes))]
    else:
        merged = loaded.base + alpha * update
        outputs = [merged[l].to(dtypes[l]).cpu() for l in range(len(dtypes))]
    for l, o in enumerate(outputs):
        if not _all_finite(o):
            raise _non_finite(loaded, l, method, backend, alpha, options, dtypes[l], plan)
    return outputs


def _non_finite(loaded: Loaded, l: int, method, backend, alpha, options, dtype, plan) -> Exception:
    """Why output `l` of a batch is not finite (the inputs are: `load_batch` checks them). The
    tensor is merged again exactly, in fp64 on the reference backend: values beyond the range
    of the output or compute dtype are the inputs' doing (a clear error that says what to do);
    anything else is a fault of the engine."""
    from .backends import backend_class
    name = loaded.batch.names[l]
    ref = backend_class("reference", "cpu")(device="cpu", compute_dtype=torch.float64)
    one = Loaded(Batch(loaded.batch.path, loaded.batch.shape, [name], loaded.batch.k), loaded.base[l:l + 1].cpu().double(),
                 None if loaded.tau is None else loaded.tau[l:l + 1].cpu().double(),
                 None if loaded.factored is None else
                 {t: tuple(x[l:l + 1].cpu().double() for x in f) for t, f in loaded.factored.items()})
    if one.tau is None and one.factored is None:
        return FloatingPointError(f"non-finite merged values in {name}: please report this with the inputs' shapes")
    base = one.base
    update, _ = _method_update(one, method, ref, options)
    if isinstance(update, LowRank):
        exact = ref.lowrank_apply(base, update.u, update.s, update.v, alpha, torch.float64)
    else:
        exact = base + alpha * update
    peak = float(exact.abs().max()) if bool(torch.isfinite(exact).all()) else math.inf
    if not math.isfinite(peak):
        return InputError(plan.base.source, name, "the merged values overflow even in float64: the task vectors or "
                          "alpha are too large")
    for what, d, flag in (("output", dtype, "--out-dtype"), ("compute", backend.compute_dtype, "--dtype")):
        reach = max(peak, abs(alpha)) if what == "compute" else peak
        if reach > torch.finfo(d).max:
            fix = f"use {flag} float32 or a smaller alpha" if d.itemsize < 4 else "use a smaller alpha"
            dtype_name = str(d).replace("torch.", "")
            return InputError(plan.base.source, name, f"the merged values (or alpha) reach {reach:.3g}, beyond the "
                              f"range of the {what} dtype {dtype_name} (max {torch.finfo(d).max:.3g}): {fix}")
    return FloatingPointError(f"non-finite merged values in {name} on backend {backend.name}, finite when merged "
                              "exactly: please report this with the inputs' shapes")


def _scaled_update(loaded: Loaded, update, alpha) -> list:
    """Each tensor's update alpha * Delta (see `run_merge`), on the CPU."""
    L = len(loaded.batch.names)
    if loaded.batch.path == COPY:
        return [None] * L
    if isinstance(update, LowRank):
        out = [(update.u[l].cpu(), alpha * update.s[l].cpu(), update.v[l].cpu()) for l in range(L)]
    else:
        out = [(alpha * update[l]).cpu() for l in range(L)]
    if not all(_all_finite(x) for o in out for x in (o if isinstance(o, tuple) else (o,))):
        raise FloatingPointError(f"non-finite update in {loaded.batch.names[0]} (and its batch): "
                                 "please report this with the inputs' shapes")
    return out


def _entry(tp, stats: dict, layer: int, seconds: float) -> dict:
    entry = {"path": tp.path, "shape": list(tp.info.shape), "time_s": round(seconds, 6)}
    if tp.path == SPECTRAL:
        entry["k"] = tp.k
        energy = stats.get("energy")
        if energy is not None:
            entry["energy"] = float(energy[layer].min())
        if stats.get("passes") is not None:
            entry["passes"] = int(stats["passes"][layer].max())
        if stats.get("capped") is not None and bool(stats["capped"][layer].any()):
            entry["capped"] = True      # stopped at max_passes below the energy target: `energy` says where
        if "sti" in stats:
            entry["sti"] = float(stats["sti"][layer])
        if "ranks" in stats:
            entry["ranks"] = stats["ranks"][layer].tolist()     # each task's rank, where they differ from k
    if tp.note:
        entry["note"] = tp.note
    return entry

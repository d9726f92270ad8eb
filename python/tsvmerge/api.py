"""The public API: merge, compress, decompress, interference."""
from __future__ import annotations

import json
import math
import os
import time

import torch

from . import __version__
from .backends import get_backend
from .engine import iter_batches, run_merge
from .io import (TSVC_FORMAT, CompressedTask, InputError, SafetensorsWriter, ShardedWriter, TensorInfo,
                 atomic_file, atomic_folder, open_checkpoint)
from .io.checkpoint import DictCheckpoint
from .methods import get_method
from .methods.tsv import concat_tasks, sti
from .primitives import upcast
from .plan import CLIP_PRESET, COPY, DEFAULT_BATCH_BYTES, SPECTRAL, plan_groups, plan_merge

BACKEND_OPTIONS = ("svd", "oversample", "power_iters", "energy_estimate")
PRESETS = {"clip": CLIP_PRESET}
DEFAULT_SHARD_SIZE = 5 * 1024**3
REPORT_NAME = "tsvmerge_report.json"


def _dtype(d) -> torch.dtype | None:
    if d is None or isinstance(d, torch.dtype):
        return d
    name = str(d).replace("torch.", "")
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64", "half": "float16"}
    out = getattr(torch, aliases.get(name, name), None)
    if not isinstance(out, torch.dtype) or not out.is_floating_point:
        raise ValueError(f"unknown floating dtype {d!r} (use float32, bfloat16, float16 or float64)")
    return out


def _open_all(base, finetuned):
    if isinstance(finetuned, (str, os.PathLike, dict)):
        raise TypeError("finetuned must be a sequence of checkpoints (a list), not a single one")
    base, tasks = open_checkpoint(base), [open_checkpoint(f) for f in finetuned]
    for task in tasks:
        why = task.base_mismatch(base) if isinstance(task, CompressedTask) else None
        if why:
            raise InputError(task.source, None, why)
    return base, tasks


def _exclusions(exclude, preset):
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return tuple(exclude) + (PRESETS[preset] if preset else ())


def _backend(name, device, compute_dtype, seed, options):
    return get_backend(name, device=device, compute_dtype=_dtype(compute_dtype) or torch.float32, seed=seed,
                       **{k: options.pop(k) for k in BACKEND_OPTIONS if k in options})


def _split_options(method, options: dict) -> dict:
    unknown = set(options) - set(method.options) - set(BACKEND_OPTIONS)
    if unknown:
        raise TypeError(f"method {method.name!r} got unknown option(s) {sorted(unknown)}; it takes "
                        f"{sorted(method.options)} plus backend options {list(BACKEND_OPTIONS)}")
    return {k: options[k] for k in method.options if k in options}


def _write_json(path, obj):
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)


def merge(base, finetuned, *, method: str = "tsv", alpha: float = 1.0, exclude=(), preset: str | None = None,
          backend: str = "auto", device: str = "cpu", compute_dtype="float32", out_dtype=None, out=None,
          shard_size: int = DEFAULT_SHARD_SIZE, report: str | None = None, seed: int = 0,
          batch_bytes: int = DEFAULT_BATCH_BYTES, overwrite: bool = False, progress: bool | None = None,
          **options):
    """Merge fine-tuned checkpoints into the base.

    `base` is a state dict or a path (file or folder); `finetuned` a sequence of the same
    (TSV-C files from `compress` are accepted too). Without `out`, returns a dict of
    merged tensors with the base's dtypes; with `out`, writes a model folder atomically
    and returns the report. `report=FILE` also writes the JSON report there.
    """
    start = time.perf_counter()
    m = get_method(method)
    options = dict(options)
    be = _backend(backend, device, compute_dtype, seed, options)
    method_options = _split_options(m, options)
    base_ckpt, tasks = _open_all(base, finetuned)
    excluded = _exclusions(exclude, preset)
    plan = plan_merge(base_ckpt, tasks, spectral=m.spectral, exclude=excluded, k=method_options.pop("k", None),
                      batch_bytes=batch_bytes)
    out_dtype = _dtype(out_dtype)
    infos = {n: TensorInfo(p.info.shape, out_dtype if (out_dtype and p.info.dtype.is_floating_point) else p.info.dtype)
             for n, p in plan.tensors.items()}
    meta = {"method": method, "alpha": alpha, "options": method_options, "exclude": list(excluded),
            "backend": be.describe(), "tsvmerge_version": __version__,
            "inputs": [{"source": c.source, "fingerprint": c.fingerprint()} for c in [base_ckpt] + tasks]}

    def finish(entries):
        # describe() again: what ran (kernel fallbacks, QR routes) is known only now
        rep = {**meta, "backend": be.describe(), "tensors": entries,
               "summary": _summary(entries, time.perf_counter() - start)}
        if report:
            _write_json(report, rep)
        return rep

    if out is None:
        merged = {}
        entries = run_merge(plan, m, be, alpha=alpha, options=method_options, write=merged.__setitem__,
                            out_dtype=out_dtype, progress=progress)
        finish(entries)
        return merged
    with atomic_folder(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, infos, shard_size, {"format": "pt", "tsvmerge": json.dumps(meta)})
        try:
            entries = run_merge(plan, m, be, alpha=alpha, options=method_options, write=writer.write,
                                out_dtype=out_dtype, progress=progress)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        rep = finish(entries)
        _write_json(os.path.join(tmp, REPORT_NAME), rep)
    return rep


def _summary(entries: dict, wall: float) -> dict:
    paths = [e["path"] for e in entries.values()]
    energies = [e["energy"] for e in entries.values() if "energy" in e]
    return {"tensors": len(entries), **{p: paths.count(p) for p in ("spectral", "mean", "copy")},
            "fallbacks": [n for n, e in entries.items() if "note" in e],
            "min_energy": min(energies) if energies else None, "wall_s": round(wall, 3)}


def interference(base, finetuned, *, exclude=(), preset: str | None = None, backend: str = "auto",
                 device: str = "cpu", compute_dtype="float32", k: int | None = None,
                 orthogonalize: str = "procrustes", seed: int = 0, batch_bytes: int = DEFAULT_BATCH_BYTES,
                 progress: bool | None = None, report: str | None = None, **options) -> dict:
    """Singular Task Interference per spectral tensor, before and after orthogonalisation,
    and the T x T task-pair overlaps ||U_i^T U_j||_F / sqrt(k) (likewise V; the diagonal is 1)."""
    options = dict(options)
    be = _backend(backend, device, compute_dtype, seed, options)
    if options:
        raise TypeError(f"interference got unknown option(s) {sorted(options)}")
    base_ckpt, tasks = _open_all(base, finetuned)
    plan = plan_merge(base_ckpt, tasks, spectral=True, exclude=_exclusions(exclude, preset), k=k,
                      batch_bytes=batch_bytes)
    T = len(tasks)
    out = {}
    for loaded in iter_batches(plan, be, [b for b in plan.batches if b.path == SPECTRAL], "interference", progress):
        kk = plan.tensors[loaded.batch.names[0]].k
        svd = loaded.svd or be.task_svd(loaded.tau, None, kk)
        u, s, v = concat_tasks(svd.u), svd.s.flatten(1), concat_tasks(svd.v)
        gu, gv = be.factor_gram(u), be.factor_gram(v)
        before = sti(gu, s, gv)
        uo, vo = be.polar(u, orthogonalize, gu), be.polar(v, orthogonalize, gv)
        after = sti(be.factor_gram(uo), s, be.factor_gram(vo))
        overlap_u, overlap_v = (_pair_overlap(g, T, kk) for g in (gu, gv))
        for l, name in enumerate(loaded.batch.names):
            out[name] = {"k": kk, "sti": float(before[l]), "sti_orthogonalized": float(after[l]),
                         "overlap_u": overlap_u[l].tolist(), "overlap_v": overlap_v[l].tolist()}
    rep = {"tasks": [t.source for t in tasks], "base": base_ckpt.source, "orthogonalize": orthogonalize,
           "backend": be.describe(), "tensors": out}
    if report:
        _write_json(report, rep)
    return rep


def _pair_overlap(g: torch.Tensor, T: int, k: int) -> torch.Tensor:
    """[L, Tk, Tk] Gram -> [L, T, T] block Frobenius norms / sqrt(k)."""
    L = g.shape[0]
    return torch.linalg.matrix_norm(g.reshape(L, T, k, T, k).transpose(2, 3)) / math.sqrt(k)


def compression_rank(shape, rank) -> int:
    """Per-tensor kept rank: a float in (0, 1] is a fraction of min(m, n), an int is absolute."""
    r = min(shape)
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"rank as a fraction must be in (0, 1], got {rank}")
        return max(1, math.ceil(rank * r))
    if int(rank) < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return min(int(rank), r)


def saves_space(shape, k: int) -> bool:
    """A rank-k factorisation of m x n stores k(m+n+1) numbers: smaller iff k < mn/(m+n+1)."""
    m, n = shape
    return k * (m + n + 1) < m * n


def compress(base, finetuned_one, *, rank=0.1, out=None, exclude=(), preset: str | None = None,
             backend: str = "reference", device: str = "cpu", compute_dtype="float32", seed: int = 0,
             batch_bytes: int = DEFAULT_BATCH_BYTES, progress: bool | None = None, **options):
    """TSV-C: store one task vector as top-`rank` factors per spectral tensor, dense elsewhere.

    With `out` (a .safetensors path) writes the file atomically and returns its report;
    without, returns an in-memory `CompressedTask` (usable wherever a task is accepted).
    Tensors where a factorisation would not save space are stored dense.
    """
    options = dict(options)
    be = _backend(backend, device, compute_dtype, seed, options)
    if options:
        raise TypeError(f"compress got unknown option(s) {sorted(options)}")
    base_ckpt, (task,) = _open_all(base, [finetuned_one])
    plan = plan_merge(base_ckpt, [task], spectral=True, exclude=_exclusions(exclude, preset),
                      batch_bytes=batch_bytes)
    ranks = {}
    for name, tp in plan.tensors.items():
        if tp.path == SPECTRAL:
            k = compression_rank(tp.info.shape, rank)
            if saves_space(tp.info.shape, k):
                ranks[name] = k
            else:
                tp.path, tp.note = "mean", f"rank {k} would not save space: stored dense"
    task_infos = task.infos()
    layout = {}
    for name, tp in plan.tensors.items():
        dtype = task_infos[name].dtype
        if name in ranks:
            (m, n), k = tp.info.shape, ranks[name]
            layout.update({f"{name}.tsvc_u": TensorInfo((m, k), dtype), f"{name}.tsvc_s": TensorInfo((k,), dtype),
                           f"{name}.tsvc_v": TensorInfo((n, k), dtype)})
        else:
            layout[name] = TensorInfo(tp.info.shape, dtype)
    meta = {"format": TSVC_FORMAT, "tsvmerge_version": __version__, "rank": str(rank),
            "spectral": json.dumps({n: list(plan.tensors[n].info.shape) for n in ranks}),
            "raw": json.dumps([n for n, tp in plan.tensors.items() if tp.path == COPY]),
            "base_fingerprint": base_ckpt.fingerprint()}
    entries, stored = {}, {}

    def run(write):
        # Re-batch with the per-tensor ranks: tensors of one shape share one k.
        for tp in plan.tensors.values():
            tp.k = ranks.get(tp.name, 0)
        batches = plan_groups(plan.tensors, 1, batch_bytes)
        for loaded in iter_batches(plan, be, batches, "compress", progress):
            _compress_batch(loaded, plan, be, task, write, entries)

    if out is None:
        run(stored.__setitem__)
        result = CompressedTask(DictCheckpoint(stored, source="<compressed>"), meta)
        result.report = _compress_report(entries, meta)
        return result
    with atomic_file(out) as tmp:
        writer = SafetensorsWriter(tmp, layout, meta)
        try:
            run(writer.write)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    return _compress_report(entries, meta)


def _compress_batch(loaded, plan, be, task, write, entries):
    names = loaded.batch.names
    if loaded.batch.path == COPY:
        for name in names:  # non-floating tensors are kept as the fine-tune has them
            write(name, task.read(name))
            entries[name] = {"path": "copy"}
        return
    tau = loaded.tau[:, 0]                                     # [L, *shape]
    if loaded.batch.path != SPECTRAL:
        for l, name in enumerate(names):
            write(name, tau[l].to(task.infos()[name].dtype).cpu())
            entries[name] = {"path": "dense", "numbers": tau[l].numel(), "dense_numbers": tau[l].numel()}
            if plan.tensors[name].note:
                entries[name]["note"] = plan.tensors[name].note
        return
    k = plan.tensors[names[0]].k
    svd = be.task_svd(loaded.tau, None, k)
    total = tau.double().pow(2).flatten(1).sum(1)
    for l, name in enumerate(names):
        dtype = task.infos()[name].dtype
        write(f"{name}.tsvc_u", svd.u[l, 0].to(dtype).cpu())
        write(f"{name}.tsvc_s", svd.s[l, 0].to(dtype).cpu())
        write(f"{name}.tsvc_v", svd.v[l, 0].to(dtype).cpu())
        m, n = plan.tensors[name].info.shape
        kept = float(svd.s[l, 0].double().pow(2).sum())
        entries[name] = {"path": "factored", "k": k, "numbers": k * (m + n + 1), "dense_numbers": m * n,
                         "tail_energy": max(0.0, 1.0 - kept / float(total[l])) if total[l] > 0 else 0.0}


def _compress_report(entries, meta) -> dict:
    stored = sum(e.get("numbers", 0) for e in entries.values())
    dense = sum(e.get("dense_numbers", 0) for e in entries.values())
    return {"format": meta["format"], "rank": meta["rank"], "tensors": entries,
            "summary": {"stored_numbers": stored, "dense_numbers": dense,
                        "ratio": stored / dense if dense else 1.0,
                        "factored": sum(e["path"] == "factored" for e in entries.values())}}


def decompress(base, compressed, *, out=None, out_dtype=None, overwrite: bool = False,
               progress: bool | None = None):
    """Rebuild theta_i ~= theta_0 + U diag(s) V^T from a TSV-C task (dense tensors added back)."""
    base_ckpt, (task,) = _open_all(base, [compressed])
    if not isinstance(task, CompressedTask):
        raise InputError(task.source, None, "is not a TSV-C file (written by tsvmerge compress)")
    plan = plan_merge(base_ckpt, [task], spectral=False)
    raw = set(json.loads(task.metadata.get("raw", "[]")))
    out_dtype = _dtype(out_dtype)

    def tensors():
        for name, tp in plan.tensors.items():
            if name in raw:
                yield name, task.read(name)
                continue
            theta = upcast(base_ckpt.read(name)) + upcast(task.read(name))
            yield name, theta.to(out_dtype or tp.info.dtype)

    if out is None:
        return dict(tensors())
    stored = task.infos()
    infos = {n: stored[n] if n in raw else TensorInfo(p.info.shape, out_dtype or p.info.dtype)
             for n, p in plan.tensors.items()}
    with atomic_folder(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, infos, DEFAULT_SHARD_SIZE, {"format": "pt", "tsvmerge": "decompressed"})
        try:
            for name, t in tensors():
                writer.write(name, t)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    return {"out": os.path.abspath(out), "tensors": len(infos)}

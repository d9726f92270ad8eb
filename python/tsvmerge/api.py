"""`merge`, and the argument handling that `tsvc` (compress, decompress) and `sti`
(interference) share with it: inputs, exclusions, dtypes, backends and their options."""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass

import torch

from . import __version__
from .backends import Backend, backend_class
from .distributed import World, join
from .engine import run_merge
from .io import (Checkpoint, CompressedTask, InputError, Output, OutputError, TensorInfo, claim, input_paths,
                 model_writers, open_checkpoint, save_json, write_json)
from .io.lora import LoraAdapter, is_adapter, lora_layouts
from .io.lora_writer import adapter_writer
from .io.model_files import carry_model_files
from .io.names import align_names
from .methods import Method, get_method
from .methods.steps import check_task_alpha
from .primitives import lowrank_apply
from .warn import warn
from .options import checked, finite_float, positive_int, resolve, split
from .plan import (CLIP_PRESET, DEFAULT_BATCH_BYTES, SPECTRAL, DENSE, COPY, EnergyBudget, MergePlan, merge_rank,
                   plan_merge, share_of, split_by_cost, tensor_cost)

PRESETS = {"clip": CLIP_PRESET}
OUTPUT_FORMATS = ("model", "peft")
DEFAULT_SHARD_SIZE = 5 * 1024**3
REPORT_NAME = "tsvmerge_report.json"


def parse_dtype(d) -> torch.dtype | None:
    if d is None or isinstance(d, torch.dtype):
        return d
    name = str(d).replace("torch.", "")
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64", "half": "float16"}
    out = getattr(torch, aliases.get(name, name), None)
    if not isinstance(out, torch.dtype) or not out.is_floating_point:
        raise ValueError(f"unknown floating dtype {d!r} (use float32, bfloat16, float16 or float64)")
    return out


def task_list(finetuned) -> list:
    if isinstance(finetuned, (str, os.PathLike, dict)):
        raise TypeError("finetuned must be a sequence of checkpoints (a list), not a single one")
    return list(finetuned)


def open_inputs(base, finetuned, trust_pickle: bool = False):
    """The base and the task checkpoints, opened lazily, the tasks under the base's names
    (`io.names`); PEFT LoRA adapter folders read as task vectors of the base (`io.lora`); TSV-C
    tasks checked against the base."""
    if is_adapter(base):
        raise InputError(os.fspath(base), None, "is a PEFT adapter, not a base model: pass the model it was "
                         "trained on as the base, and the adapter as a task")
    base = open_checkpoint(base, trust_pickle)
    tasks = [LoraAdapter(f, base, trust_pickle) if is_adapter(f) else align_names(open_checkpoint(f, trust_pickle), base)
             for f in task_list(finetuned)]
    if isinstance(base, CompressedTask):
        raise InputError(base.source, None, "is a TSV-C file (a compressed task vector), not a base model: "
                         "pass the base checkpoint it was made from")
    for task in tasks:
        why = task.base_mismatch(base) if isinstance(task, CompressedTask) else None
        if why:
            raise InputError(task.source, None, why)
    return base, tasks


def input_warnings(base: Checkpoint, tasks: list, *, single: str | None = None) -> list[str]:
    """What a user should know about the task list, by fingerprint (a few bytes per tensor,
    computed for the report anyway): a task that is the base or equals it, a task given twice,
    and `single` where only one task is given. Each is warned, and returned for the report."""
    found = [single] if single and len(tasks) == 1 else []
    base_fp, base_path = base.fingerprint(), _real(base.source)
    first = {}
    for i, task in enumerate(tasks):
        label, fp = f"task {i + 1} ({task.source})", task.fingerprint()
        if fp == base_fp:
            what = "is the base itself" if _real(task.source) == base_path else "is identical to the base"
            found.append(f"{label} {what} (same fingerprint): its task vector is zero")
        if fp in first:
            found.append(f"{label} is the same model as {first[fp]} (same fingerprint): it counts twice")
        first.setdefault(fp, label)
    for message in found:
        warn(message)
    return found


def _real(source) -> str | None:
    return os.path.realpath(source) if isinstance(source, str) and os.path.exists(source) else None


def exclusions(exclude, preset) -> tuple:
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if isinstance(exclude, str):
        exclude = [exclude]
    return tuple(exclude) + (PRESETS[preset] if preset else ())


def make_backend(name, device, compute_dtype, seed, options: dict):
    """The backend, with `options` checked against what it declares."""
    cls = backend_class(name, device)
    return cls(device=torch.device(device), compute_dtype=parse_dtype(compute_dtype) or torch.float32,
               seed=seed, **options)


def split_options(options: dict, method, backend_name: str, device) -> tuple[dict, dict]:
    """(method options resolved to their declared defaults, backend options as given); a name
    neither declares raises TypeError naming what both take."""
    backend_options = backend_class(backend_name, device).OPTIONS
    for_method, for_backend, unknown = split(options, method.options, backend_options)
    if unknown:
        takes = sorted(o.name for o in method.options + backend_options)
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))} for method {method.name!r} on backend "
                        f"{backend_name!r}; they take: {', '.join(takes) or 'none'}")
    return resolve(method.options, for_method, f"method {method.name!r}"), for_backend


def claim_distinct(*outputs: Output | None) -> None:
    """Two outputs of one run may not be one path, nor one inside the other."""
    outs = [o for o in outputs if o is not None]
    for i, a in enumerate(outs):
        for b in outs[i + 1:]:
            if a.path == b.path or a.path.startswith(b.path + os.sep) or b.path.startswith(a.path + os.sep):
                raise OutputError(b.path, f"is also an output of this run ({a.path}): choose separate paths")


def describe_inputs(checkpoints) -> list[dict]:
    """The report's record of each input: where it came from, its fingerprint, how it was read."""
    return [{"source": c.source, "fingerprint": c.fingerprint(), **({"notes": list(c.notes)} if c.notes else {}),
             **({"touches": c.touches} if isinstance(c, LoraAdapter) else {})} for c in checkpoints]


def alpha_folder(alpha: float) -> str:
    """The sub-folder of a merge's `out` for one of several alphas: alpha-0.5 (the shortest
    text that reads back as the same float, so distinct alphas get distinct folders)."""
    return f"alpha-{alpha!r}"


def _report_file(reports: dict, several: bool) -> dict:
    """What `report=FILE` holds: the report, or with several alphas {"alpha-A": report}."""
    return {alpha_folder(a): r for a, r in reports.items()} if several else next(iter(reports.values()))


def _output_infos(infos: dict, out_dtype) -> dict:
    """The output's tensor infos: the input's, with floating tensors in `out_dtype` when given."""
    return {n: TensorInfo(i.shape, out_dtype if (out_dtype and i.dtype.is_floating_point) else i.dtype)
            for n, i in infos.items()}


def alpha_list(alphas) -> tuple[float, ...]:
    """Several alphas, each finite, none twice."""
    if isinstance(alphas, (str, bytes)) or not hasattr(alphas, "__iter__"):
        raise TypeError(f"alphas must be a sequence of numbers, not {type(alphas).__name__}")
    out = tuple(checked("alphas", finite_float, a) for a in alphas)
    if not out:
        raise ValueError("alphas is empty: give at least one alpha")
    for i, a in enumerate(out):
        if a in out[:i]:
            raise ValueError(f"alphas: {a!r} is given twice")
    return out


@dataclass
class _Merge:
    """A merge planned from headers, before any compute: what `merge` and `update` share. In a
    distributed run (`world`), `shares` holds each rank's batches (`plan.split_by_cost`)."""
    plan: MergePlan
    method: Method
    backend: Backend
    options: dict           # the method's, resolved
    meta: dict              # the report's and the metadata's description of the merge
    warned: list
    start: float
    world: World
    shares: list | None = None
    ranks: list | None = None       # each rank's part of the report, once gathered

    def run(self, outputs: list, *, updates: bool = False, out_dtype=None, progress=None) -> dict:
        """`run_merge` of this rank's share over `outputs` ((alpha, write) pairs); the report
        entries of every rank's tensors, in the base's order."""
        plan = share_of(self.plan, self.shares[self.world.rank]) if self.shares else self.plan
        entries = run_merge(plan, self.method, self.backend, outputs=outputs, options=self.options,
                            out_dtype=out_dtype, progress=progress, updates=updates, world=self.world)
        if self.world.size == 1:
            return entries
        parts = self.world.gather((entries, self.world.report()))
        merged = {name: e for part, _ in parts for name, e in part.items()}
        self.ranks = [{**rank, "tensors": len(part), "share": round(_cost_share(self, i), 4)}
                      for i, (part, rank) in enumerate(parts)]
        return {name: merged[name] for name in self.plan.tensors}

    def share_names(self) -> list | None:
        """Each rank's tensor names, in the base's order (None in a single process)."""
        if not self.shares:
            return None
        order = {n: i for i, n in enumerate(self.plan.tensors)}
        return [sorted((n for b in share for n in b.names), key=order.__getitem__) for share in self.shares]

    def report(self, entries: dict, alpha: float | None, **more) -> dict:
        ranks = {"ranks": self.ranks} if self.ranks else {}
        return {**self.meta, "alpha": alpha, **more, "warnings": self.warned, "backend": self.backend.describe(),
                "tensors": entries, "summary": _summary(entries, time.perf_counter() - self.start), **ranks}


def _cost_share(job: _Merge, rank: int) -> float:
    """Rank `rank`'s share of the merge's estimated cost (`plan.tensor_cost`)."""
    T = len(job.plan.tasks)
    cost = {n: tensor_cost(tp, T) for n, tp in job.plan.tensors.items()}
    return sum(cost[n] for b in job.shares[rank] for n in b.names) / max(sum(cost.values()), 1e-30)


def _same_inputs(world: World, meta: dict) -> None:
    """Every rank reads the same inputs (a file system they share): their fingerprints are
    rank 0's."""
    inputs = meta["inputs"]
    for rank, prints in enumerate(world.gather([i["fingerprint"] for i in inputs])):
        for entry, fp in zip(inputs, prints):
            if fp != entry["fingerprint"]:
                raise InputError(entry["source"], None, f"rank {rank} reads other contents here than rank {world.rank} "
                                 "(their fingerprints differ): every rank must read the same inputs, from a file "
                                 "system they share")


def _methods(method: str, backend: str, device, compute_dtype, seed, options: dict):
    """The method, its resolved options and the backend: every option checked before any output
    is claimed or input read."""
    m = get_method(method)
    method_options, backend_options = split_options(options, m, backend, device)
    return m, method_options, make_backend(backend, device, compute_dtype, seed, backend_options)


def _planned(base, finetuned: list, m, method_options: dict, be, *, exclude, preset, batch_bytes: int,
             trust_pickle: bool, start: float, world: World | None = None) -> _Merge:
    base_ckpt, tasks = open_inputs(base, finetuned, trust_pickle)
    check_task_alpha(method_options["task_alpha"], len(tasks))
    excluded = exclusions(exclude, preset)
    k = method_options.pop("k", None)
    rank = functools.partial(m.rank or merge_rank, T=len(tasks), k=k) if m.spectral else None
    plan = plan_merge(base_ckpt, tasks, spectral_rank=rank, exclude=excluded, batch_bytes=batch_bytes)
    meta = {"method": m.name, "alpha": None,
            "options": {**method_options, **({"k": str(k) if isinstance(k, EnergyBudget) else k}
                                             if any(o.name == "k" for o in m.options) else {})},
            "exclude": list(excluded), "backend": be.describe(), "tsvmerge_version": __version__,
            "inputs": describe_inputs([base_ckpt] + tasks)}
    if isinstance(k, EnergyBudget):
        method_options["energy"] = k.share      # the plan loads every triplet; the method picks the ranks
    warned = input_warnings(base_ckpt, tasks, single="only one fine-tuned model: the merge adds its task vector "
                           "(times alpha) to the base, there is nothing to merge it with")
    world = world or World()
    shares = split_by_cost(plan, plan.batches, world.size) if world.size > 1 else None
    return _Merge(plan, m, be, method_options, meta, warned, start, world, shares)


def merge(base, finetuned, *, method: str = "tsv", alpha: float = 1.0, exclude=(), preset: str | None = None,
          backend: str = "auto", device: str = "cpu", compute_dtype="float32", out_dtype=None, out=None,
          shard_size: int = DEFAULT_SHARD_SIZE, report: str | None = None, seed: int = 0,
          batch_bytes: int = DEFAULT_BATCH_BYTES, overwrite: bool = False, progress: bool | None = None,
          trust_pickle: bool = False, output_format: str = "model", alphas=None, distributed: bool = False,
          **options):
    """Merge fine-tuned checkpoints into the base.

    `base` is a state dict or a path (file or folder); `finetuned` a sequence of the same
    (TSV-C files from `compress` and PEFT LoRA adapter folders are accepted too). Without `out`,
    returns a dict of merged tensors with the base's dtypes and names; with `out`, writes a model
    folder and returns the report (a base folder's config and tokenizer files are carried over:
    `io.model_files`); with `output_format="peft"` as well, the merged update as a PEFT LoRA
    adapter folder instead (`io.lora_writer`; method tsv, and only matrices on the spectral path
    may change). `alpha` scales the merged update; a list, one number per task, scales each task
    vector before the merge instead (the same as `task_alpha=[...]`, which combines with a
    global `alpha`). `report=FILE` also writes the JSON report there. Outputs are published
    whole at the end (`io.publish`): an existing one is replaced only with `overwrite=True`,
    and never an input. `trust_pickle` lets `.pt/.bin` files that hold whole pickled modules be
    unpickled (it can run code). `options` are the method's and the backend's
    (`tsvmerge.METHODS[name].options`, `backend.OPTIONS`).

    `alphas` (instead of `alpha`): several merges for the price of one: the update is computed
    once and each alpha's merge made from it, exactly as `alpha` alone would make it; returns
    {alpha: merged dict}, or with `out` writes a model folder `out/alpha-A/` for each (all
    published in one rename, or none) and returns {alpha: report}; `report=FILE` then holds
    {"alpha-A": report}.

    `distributed=True` in each process torchrun starts: one merge across them all, written to
    `out` (`tsvmerge.distributed`); each process returns the report, which gives every rank's
    share, wall time and peak memory (`ranks`). Without torchrun's environment it is one process.
    """
    start = time.perf_counter()
    world, device = join(device) if distributed else (World(), device)
    finetuned = task_list(finetuned)
    alpha, options = _per_task_alpha(alpha, options)

    def planned():
        """Every argument checked and the merge planned, on every rank; rank 0 claims the outputs."""
        several = alphas is not None
        if several and alpha != 1.0:
            raise ValueError("give alpha or alphas, not both")
        alpha_values = alpha_list(alphas) if several else (checked("alpha", finite_float, alpha),)
        m, method_options, be = _methods(method, backend, device, compute_dtype, seed, options)
        adapter_out = _adapter_output(output_format, out, m)
        if adapter_out and several:
            raise ValueError("output format peft writes one adapter: give one alpha")
        if world.size > 1 and (out is None or adapter_out):
            raise ValueError("a merge across processes writes a model folder: give out (-o), and output format model")
        sizes = checked("shard_size", positive_int, shard_size), checked("batch_bytes", positive_int, batch_bytes)
        inputs = input_paths([base, *finetuned])
        out_t = report_t = None
        if world.main:
            out_t = claim(out, folder=True, overwrite=overwrite, inputs=inputs) if out is not None else None
            report_t = claim(report, folder=False, overwrite=overwrite, inputs=inputs) if report else None
            claim_distinct(out_t, report_t)
        job = _planned(base, finetuned, m, method_options, be, exclude=exclude, preset=preset, batch_bytes=sizes[1],
                       trust_pickle=trust_pickle, start=start, world=world)
        return job, alpha_values, several, adapter_out, sizes[0], parse_dtype(out_dtype), out_t, report_t

    job, alpha_values, several, adapter_out, shard_bytes, out_dtype_, out_t, report_t = world.agree(planned)
    world.agree(lambda: _same_inputs(world, job.meta))
    plan = job.plan

    if out is None:
        merged = {a: {} for a in alpha_values}
        entries = job.run([(a, merged[a].__setitem__) for a in alpha_values], out_dtype=out_dtype_, progress=progress)
        if report_t:
            reports = {a: job.report(entries, a) for a in alpha_values}
            save_json(report_t, _report_file(reports, several))
        return merged if several else merged[alpha_values[0]]
    infos = _output_infos({n: p.info for n, p in plan.tensors.items()}, out_dtype_)
    if adapter_out:
        plan.batches.sort(key=lambda b: b.path == SPECTRAL)  # what must not change is checked first
        with adapter_writer(out_t, lora_layouts(plan.tasks), _path_of(base), also=(report_t,)) as writer:
            entries = job.run([(alpha_values[0], lambda name, u: writer.write(name, u, infos[name].dtype))],
                              updates=True, progress=progress)
            rep = job.report(entries, alpha_values[0], adapter=writer.summary())
            write_json(os.path.join(writer.folder, REPORT_NAME), rep)
            if report_t:
                write_json(writer.also[0], rep)
        return rep
    folders = {a: alpha_folder(a) if several else "" for a in alpha_values}
    metadata = {folders[a]: {"format": "pt", "tsvmerge": json.dumps({**job.meta, "alpha": a})} for a in alpha_values}
    with model_writers(out_t, infos, metadata, shard_size=shard_bytes, also=(report_t,), world=world,
                       shares=job.share_names()) as writers:
        carried = [carry_model_files(base, w.folder) for w in writers][0] if world.main else None  # into each
        entries = job.run([(a, w.write) for a, w in zip(alpha_values, writers)], out_dtype=out_dtype_,
                          progress=progress)
        reports = {a: job.report(entries, a, carried=carried) for a in alpha_values}
        if world.main:
            for a, w in zip(alpha_values, writers):
                write_json(os.path.join(w.folder, REPORT_NAME), reports[a])
            if report_t:
                write_json(writers[0].also[0], _report_file(reports, several))
    return reports if several else reports[alpha_values[0]]


@dataclass
class Update:
    """A merge's update Delta, not applied: the merge with any alpha is base + alpha * Delta
    (`apply`). `tensors` maps each of the base's names to (u [m, K], s [K], v [n, K]) with
    Delta = u diag(s) v^T on the spectral path (the factors, never the dense matrix), a dense
    Delta elsewhere, or None (a tensor the merge copies from the base); on the CPU, in the
    compute dtype. `report` is the merge's and `meta` its description (an output's metadata),
    with alpha None."""
    tensors: dict
    report: dict
    meta: dict


def update(base, finetuned, *, method: str = "tsv", exclude=(), preset: str | None = None, backend: str = "auto",
           device: str = "cpu", compute_dtype="float32", seed: int = 0, batch_bytes: int = DEFAULT_BATCH_BYTES,
           progress: bool | None = None, trust_pickle: bool = False, **options) -> Update:
    """The update `merge` would add to the base, computed once (the SVD work) and not applied:
    `apply(base, update, alpha)` then makes the merge with any alpha in one pass. Arguments as
    `merge`'s."""
    start = time.perf_counter()
    finetuned = task_list(finetuned)
    m, method_options, be = _methods(method, backend, device, compute_dtype, seed, options)
    batch_bytes = checked("batch_bytes", positive_int, batch_bytes)
    job = _planned(base, finetuned, m, method_options, be, exclude=exclude, preset=preset, batch_bytes=batch_bytes,
                   trust_pickle=trust_pickle, start=start)
    tensors = {}
    entries = job.run([(1.0, tensors.__setitem__)], updates=True, progress=progress)
    return Update({n: tensors[n] for n in job.plan.tensors}, job.report(entries, None), job.meta)


def apply(base, update: Update, alpha: float = 1.0, *, out=None, out_dtype=None,
          shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False, trust_pickle: bool = False):
    """base + alpha * `update` (from `update`, on the same base), one tensor at a time, exactly as
    `merge` with that alpha makes it: a dict of tensors with the base's names and dtypes (or
    `out_dtype`), or with `out` a model folder published as `merge` publishes one, with its
    report (the update's, with this alpha), which `apply` returns."""
    alpha = checked("alpha", finite_float, alpha)
    if not isinstance(update, Update):
        raise TypeError(f"update must be a tsvmerge.Update (from tsvmerge.update), not {type(update).__name__}")
    out_dtype = parse_dtype(out_dtype)
    shard_size = checked("shard_size", positive_int, shard_size)
    out_t = claim(out, folder=True, overwrite=overwrite, inputs=input_paths([base])) if out is not None else None
    base_ckpt = open_checkpoint(base, trust_pickle)
    infos = _output_infos(_matching(base_ckpt, update), out_dtype)

    def run(write):
        for name, delta in update.tensors.items():
            write(name, applied(base_ckpt, name, delta, alpha, infos[name].dtype))
        base_ckpt.release()

    if out_t is None:
        merged = {}
        run(merged.__setitem__)
        return merged
    rep = {**update.report, "alpha": alpha}
    metadata = {"format": "pt", "tsvmerge": json.dumps({**update.meta, "alpha": alpha})}
    with model_writers(out_t, infos, {"": metadata}, shard_size=shard_size) as (writer,):
        rep["carried"] = carry_model_files(base, writer.folder)
        run(writer.write)
        write_json(os.path.join(writer.folder, REPORT_NAME), rep)
    return rep


def _matching(base: Checkpoint, update: Update) -> dict:
    """The base's tensor infos, when its names and shapes are the update's."""
    infos = base.infos()
    for name in set(infos) ^ set(update.tensors):
        where = "the update" if name in infos else "the base"
        raise InputError(base.source, name, f"is not in {where}: apply an update to the base it was computed from")
    for name, delta in update.tensors.items():
        shape = None if delta is None else (delta.shape if isinstance(delta, torch.Tensor) else
                                            (delta[0].shape[0], delta[2].shape[0]))
        if shape is not None and tuple(shape) != tuple(infos[name].shape):
            raise InputError(base.source, name, f"has shape {list(infos[name].shape)}, and its update "
                             f"{list(shape)}: apply an update to the base it was computed from")
    return infos


def applied(base: Checkpoint, name: str, delta, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """One tensor of `apply`: the arithmetic of `engine._applied` (the merge's), for one tensor."""
    x = base.read(name)
    if delta is None:
        return x.to(dtype, copy=True)
    if isinstance(delta, torch.Tensor):
        out = (x.to(delta.dtype) + alpha * delta).to(dtype)
    else:
        u, s, v = delta
        out = lowrank_apply(x.to(u.dtype)[None], u[None], s[None], v[None], alpha, dtype)[0]
    if not bool(torch.isfinite(out).all()):
        if not bool(torch.isfinite(x).all()):
            raise InputError(base.source, name, "contains NaN or Inf values: corrupted checkpoint?")
        raise InputError(base.source, name, f"base + {alpha:g} * update is not finite in "
                         f"{str(dtype).replace('torch.', '')}: use a smaller alpha or a wider out_dtype")
    return out


def _per_task_alpha(alpha, options: dict) -> tuple:
    """alpha=[a_1, ..., a_T] is task_alpha with the global alpha 1 (FusionBench's TSV-M list)."""
    if not isinstance(alpha, (list, tuple)):
        return alpha, options
    if "task_alpha" in options:
        raise ValueError("alpha is a list (one per task) and task_alpha is given too: give the per-task alphas once")
    return 1.0, {**options, "task_alpha": alpha}


def _adapter_output(output_format: str, out, method) -> bool:
    """Whether the output is a PEFT adapter; refuses what cannot be one before any work."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    if output_format != "peft":
        return False
    if out is None:
        raise ValueError("output format peft writes an adapter folder: pass out (-o)")
    if not method.spectral:
        raise ValueError(f"output format peft: method {method.name} makes no low-rank update (it combines the task "
                         "vectors entry by entry), so its result cannot be a LoRA: use method tsv")
    return True


def _path_of(src) -> str | None:
    return os.path.abspath(src) if isinstance(src, (str, os.PathLike)) else None


def _summary(entries: dict, wall: float) -> dict:
    paths = [e["path"] for e in entries.values()]
    energies = [e["energy"] for e in entries.values() if "energy" in e]
    return {"tensors": len(entries), **{p: paths.count(p) for p in (SPECTRAL, DENSE, COPY)},
            "fallbacks": [n for n, e in entries.items() if "note" in e],
            "min_energy": min(energies) if energies else None,
            "capped": {n: e["energy"] for n, e in entries.items() if e.get("capped")}, "wall_s": round(wall, 3)}

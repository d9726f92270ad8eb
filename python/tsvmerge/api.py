"""`merge`, and the argument handling that `tsvc` (compress, decompress) and `sti`
(interference) share with it: inputs, exclusions, dtypes, backends and their options."""
from __future__ import annotations

import functools
import json
import os
import time

import torch

from . import __version__
from .backends import backend_class
from .engine import run_merge
from .io import (Checkpoint, CompressedTask, InputError, Output, OutputError, TensorInfo, claim, input_paths,
                 model_writer, open_checkpoint, save_json, write_json)
from .io.lora import LoraAdapter, is_adapter, lora_layouts
from .io.lora_writer import adapter_writer
from .io.model_files import carry_model_files
from .io.names import align_names
from .methods import get_method
from .warn import warn
from .options import checked, finite_float, positive_int, resolve, split
from .plan import CLIP_PRESET, DEFAULT_BATCH_BYTES, SPECTRAL, DENSE, COPY, EnergyBudget, merge_rank, plan_merge

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


def merge(base, finetuned, *, method: str = "tsv", alpha: float = 1.0, exclude=(), preset: str | None = None,
          backend: str = "auto", device: str = "cpu", compute_dtype="float32", out_dtype=None, out=None,
          shard_size: int = DEFAULT_SHARD_SIZE, report: str | None = None, seed: int = 0,
          batch_bytes: int = DEFAULT_BATCH_BYTES, overwrite: bool = False, progress: bool | None = None,
          trust_pickle: bool = False, output_format: str = "model", **options):
    """Merge fine-tuned checkpoints into the base.

    `base` is a state dict or a path (file or folder); `finetuned` a sequence of the same
    (TSV-C files from `compress` and PEFT LoRA adapter folders are accepted too). Without `out`,
    returns a dict of merged tensors with the base's dtypes and names; with `out`, writes a model
    folder and returns the report (a base folder's config and tokenizer files are carried over:
    `io.model_files`); with `output_format="peft"` as well, the merged update as a PEFT LoRA
    adapter folder instead (`io.lora_writer`; method tsv, and only matrices on the spectral path
    may change). `report=FILE` also writes the JSON report there. Outputs are published
    whole at the end (`io.publish`): an existing one is replaced only with `overwrite=True`,
    and never an input. `trust_pickle` lets `.pt/.bin` files that hold whole pickled modules be
    unpickled (it can run code). `options` are the method's and the backend's
    (`tsvmerge.METHODS[name].options`, `backend.OPTIONS`).
    """
    start = time.perf_counter()
    finetuned = task_list(finetuned)
    alpha = checked("alpha", finite_float, alpha)
    m = get_method(method)
    adapter_out = _adapter_output(output_format, out, m)
    method_options, backend_options = split_options(options, m, backend, device)
    be = make_backend(backend, device, compute_dtype, seed, backend_options)
    shard_size = checked("shard_size", positive_int, shard_size)
    batch_bytes = checked("batch_bytes", positive_int, batch_bytes)
    out_dtype = parse_dtype(out_dtype)
    inputs = input_paths([base, *finetuned])
    out_t = claim(out, folder=True, overwrite=overwrite, inputs=inputs) if out is not None else None
    report_t = claim(report, folder=False, overwrite=overwrite, inputs=inputs) if report else None
    claim_distinct(out_t, report_t)
    base_ckpt, tasks = open_inputs(base, finetuned, trust_pickle)
    excluded = exclusions(exclude, preset)
    k = method_options.pop("k", None)
    rank = functools.partial(m.rank or merge_rank, T=len(tasks), k=k) if m.spectral else None
    plan = plan_merge(base_ckpt, tasks, spectral_rank=rank, exclude=excluded, batch_bytes=batch_bytes)
    infos = {n: TensorInfo(p.info.shape, out_dtype if (out_dtype and p.info.dtype.is_floating_point) else p.info.dtype)
             for n, p in plan.tensors.items()}
    meta = {"method": method, "alpha": alpha,
            "options": {**method_options, **({"k": str(k) if isinstance(k, EnergyBudget) else k}
                                             if any(o.name == "k" for o in m.options) else {})},
            "exclude": list(excluded), "backend": be.describe(), "tsvmerge_version": __version__,
            "inputs": describe_inputs([base_ckpt] + tasks)}
    if isinstance(k, EnergyBudget):
        method_options["energy"] = k.share      # the plan loads every triplet; the method picks the ranks
    warned = input_warnings(base_ckpt, tasks, single="only one fine-tuned model: the merge adds its task vector "
                           "(times alpha) to the base, there is nothing to merge it with")

    def run(write, carried=None, adapter=None):
        entries = run_merge(plan, m, be, alpha=alpha, options=method_options, write=write, out_dtype=out_dtype,
                            progress=progress, updates=adapter is not None)
        return {**meta, **({} if carried is None else {"carried": carried}),
                **({} if adapter is None else {"adapter": adapter.summary()}), "warnings": warned,
                "backend": be.describe(), "tensors": entries,
                "summary": _summary(entries, time.perf_counter() - start)}

    if out_t is None:
        merged = {}
        rep = run(merged.__setitem__)
        if report_t:
            save_json(report_t, rep)
        return merged
    if adapter_out:
        plan.batches.sort(key=lambda b: b.path == SPECTRAL)  # what must not change is checked first
        with adapter_writer(out_t, lora_layouts(tasks), _path_of(base), also=(report_t,)) as writer:
            rep = run(lambda name, update: writer.write(name, update, infos[name].dtype), adapter=writer)
            write_json(os.path.join(writer.folder, REPORT_NAME), rep)
            if report_t:
                write_json(writer.also[0], rep)
        return rep
    with model_writer(out_t, infos, {"format": "pt", "tsvmerge": json.dumps(meta)}, shard_size=shard_size,
                      also=(report_t,)) as writer:
        rep = run(writer.write, carry_model_files(base, writer.folder))
        write_json(os.path.join(writer.folder, REPORT_NAME), rep)
        if report_t:
            write_json(writer.also[0], rep)
    return rep


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

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
from .io import CompressedTask, InputError, TensorInfo, atomic_file, model_writer, open_checkpoint
from .io.model_files import carry_model_files
from .io.names import align_names
from .methods import get_method
from .options import resolve, split
from .plan import CLIP_PRESET, DEFAULT_BATCH_BYTES, SPECTRAL, DENSE, COPY, merge_rank, plan_merge

PRESETS = {"clip": CLIP_PRESET}
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


def open_inputs(base, finetuned, trust_pickle: bool = False):
    """The base and the task checkpoints, opened lazily, the tasks under the base's names
    (`io.names`); TSV-C tasks checked against the base."""
    if isinstance(finetuned, (str, os.PathLike, dict)):
        raise TypeError("finetuned must be a sequence of checkpoints (a list), not a single one")
    base = open_checkpoint(base, trust_pickle)
    tasks = [align_names(open_checkpoint(f, trust_pickle), base) for f in finetuned]
    if isinstance(base, CompressedTask):
        raise InputError(base.source, None, "is a TSV-C file (a compressed task vector), not a base model: "
                         "pass the base checkpoint it was made from")
    for task in tasks:
        why = task.base_mismatch(base) if isinstance(task, CompressedTask) else None
        if why:
            raise InputError(task.source, None, why)
    return base, tasks


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


def describe_inputs(checkpoints) -> list[dict]:
    """The report's record of each input: where it came from, its fingerprint, how it was read."""
    return [{"source": c.source, "fingerprint": c.fingerprint(), **({"notes": list(c.notes)} if c.notes else {})}
            for c in checkpoints]


def write_json(path, obj):
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)


def merge(base, finetuned, *, method: str = "tsv", alpha: float = 1.0, exclude=(), preset: str | None = None,
          backend: str = "auto", device: str = "cpu", compute_dtype="float32", out_dtype=None, out=None,
          shard_size: int = DEFAULT_SHARD_SIZE, report: str | None = None, seed: int = 0,
          batch_bytes: int = DEFAULT_BATCH_BYTES, overwrite: bool = False, progress: bool | None = None,
          trust_pickle: bool = False, **options):
    """Merge fine-tuned checkpoints into the base.

    `base` is a state dict or a path (file or folder); `finetuned` a sequence of the same
    (TSV-C files from `compress` are accepted too). Without `out`, returns a dict of
    merged tensors with the base's dtypes and names; with `out`, writes a model folder
    atomically and returns the report (a base folder's config and tokenizer files are carried
    over: `io.model_files`). `report=FILE` also writes the JSON report there. `trust_pickle`
    lets `.pt/.bin` files that hold whole pickled modules be unpickled (it can run code).
    `options` are the method's and the backend's (`tsvmerge.METHODS[name].options`,
    `backend.OPTIONS`).
    """
    start = time.perf_counter()
    m = get_method(method)
    method_options, backend_options = split_options(options, m, backend, device)
    be = make_backend(backend, device, compute_dtype, seed, backend_options)
    base_ckpt, tasks = open_inputs(base, finetuned, trust_pickle)
    excluded = exclusions(exclude, preset)
    k = method_options.pop("k", None)
    rank = functools.partial(merge_rank, T=len(tasks), k=k) if m.spectral else None
    plan = plan_merge(base_ckpt, tasks, spectral_rank=rank, exclude=excluded, batch_bytes=batch_bytes)
    out_dtype = parse_dtype(out_dtype)
    infos = {n: TensorInfo(p.info.shape, out_dtype if (out_dtype and p.info.dtype.is_floating_point) else p.info.dtype)
             for n, p in plan.tensors.items()}
    meta = {"method": method, "alpha": alpha, "options": {**method_options, **({"k": k} if m.spectral else {})},
            "exclude": list(excluded), "backend": be.describe(), "tsvmerge_version": __version__,
            "inputs": describe_inputs([base_ckpt] + tasks)}

    def run(write, carried=None):
        entries = run_merge(plan, m, be, alpha=alpha, options=method_options, write=write, out_dtype=out_dtype,
                            progress=progress)
        rep = {**meta, **({} if carried is None else {"carried": carried}), "tensors": entries,
               "summary": _summary(entries, time.perf_counter() - start)}
        if report:
            write_json(report, rep)
        return rep

    if out is None:
        merged = {}
        run(merged.__setitem__)
        return merged
    with model_writer(out, infos, {"format": "pt", "tsvmerge": json.dumps(meta)}, shard_size=shard_size,
                      overwrite=overwrite) as writer:
        rep = run(writer.write, carry_model_files(base, writer.folder))
        write_json(os.path.join(writer.folder, REPORT_NAME), rep)
    return rep


def _summary(entries: dict, wall: float) -> dict:
    paths = [e["path"] for e in entries.values()]
    energies = [e["energy"] for e in entries.values() if "energy" in e]
    return {"tensors": len(entries), **{p: paths.count(p) for p in (SPECTRAL, DENSE, COPY)},
            "fallbacks": [n for n, e in entries.items() if "note" in e],
            "min_energy": min(energies) if energies else None, "wall_s": round(wall, 3)}

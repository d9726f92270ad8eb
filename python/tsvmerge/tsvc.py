"""TSV-C (task vector compression): `compress` keeps each spectral tensor of one task vector as
its top-k factors, `decompress` rebuilds the fine-tuned model. The file layout is
`io.tsvc_file`'s; merging straight from compressed files is the engine's (`engine.load_batch`).
"""
from __future__ import annotations

import functools
import math
import os

import torch

from . import __version__
from .api import DEFAULT_SHARD_SIZE, OUTPUT_FORMATS, _path_of, exclusions, input_warnings, make_backend, \
    open_inputs, parse_dtype
from .distributed import World, join
from .engine import iter_batches
from .io import CompressedTask, InputError, Output, TensorInfo, claim, file_writer, input_paths, model_writer
from .io.checkpoint import Checkpoint, DictCheckpoint
from .io.lora_writer import adapter_writer
from .io.model_files import carry_model_files
from .io import tsvc_file
from .plan import COPY, DEFAULT_BATCH_BYTES, SPECTRAL, plan_merge, share_of, split_by_cost


def compression_rank(shape, rank) -> int:
    """Per-tensor kept rank: a float in (0, 1] is a fraction of min(m, n), an int is absolute."""
    r = min(shape)
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"rank as a fraction must be in (0, 1], got {rank}")
        return max(1, math.ceil(rank * r))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a fraction in (0, 1] or a whole number >= 1, got {rank!r}")
    return min(rank, r)


def saves_space(shape, k: int) -> bool:
    """A rank-k factorisation of m x n stores k(m+n+1) numbers: smaller iff k < mn/(m+n+1)."""
    m, n = shape
    return k * (m + n + 1) < m * n


def stored_rank(shape, rank) -> tuple[int, str]:
    """The planner's rule for compress: the kept rank, or 0 (stored dense) with the reason."""
    k = compression_rank(shape, rank)
    return (k, "") if saves_space(shape, k) else (0, f"rank {k} would not save space: stored dense")


def compressed_path(out, task) -> str:
    """Where `compress` writes: `out`, or where `out` is a folder (one that exists, or a path
    ending in a separator, made if missing) a file in it named after the task, as `cp` does:
    DIR/NAME.tsvc.safetensors."""
    text = os.fspath(out)
    if not (text.endswith(("/", os.sep)) or os.path.isdir(text)):
        return text
    name = os.path.basename(os.path.normpath(os.fspath(task))) if isinstance(task, (str, os.PathLike)) else "task"
    for ext in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        if name.endswith(ext) and len(name) > len(ext):
            name = name[: -len(ext)]
            break
    return os.path.join(text, name + ".tsvc.safetensors")


def compress(base, finetuned_one, *, rank=0.1, out=None, overwrite: bool = False, exclude=(),
             preset: str | None = None, backend: str = "reference", device: str = "cpu", compute_dtype="float32",
             seed: int = 0, batch_bytes: int = DEFAULT_BATCH_BYTES, progress: bool | None = None,
             trust_pickle: bool = False, distributed: bool = False, **options):
    """TSV-C: store one task vector as top-`rank` factors per spectral tensor, dense elsewhere.

    With `out` (a .safetensors path, or a folder: see `compressed_path`) writes the file and
    returns its report (`report["out"]` is the file); without, returns an in-memory
    `CompressedTask` (usable wherever a task is accepted). Tensors where a factorisation
    would not save space are stored dense. `distributed=True` under torchrun: one compression
    across the processes, each writing its tensors into the one file (`tsvmerge.distributed`).
    """
    world, device = join(device) if distributed else (World(), device)

    def planned():
        compression_rank((1 << 62, 1 << 62), rank)          # a bad rank fails before any work
        be = make_backend(backend, device, compute_dtype, seed, options)
        if world.size > 1 and out is None:
            raise ValueError("a compression across processes writes a file: give out (-o)")
        target = None
        if out is not None and world.main:
            target = claim(compressed_path(out, finetuned_one), folder=False, overwrite=overwrite,
                           inputs=input_paths([base, finetuned_one]))
        base_ckpt, (task,) = open_inputs(base, [finetuned_one], trust_pickle)
        if isinstance(task, CompressedTask):
            raise InputError(task.source, None, "is already a TSV-C file: pass the fine-tuned checkpoint")
        if task.is_delta:
            raise InputError(task.source, None, "is a LoRA adapter, a task vector stored low-rank already: merge it "
                             "as it is, or compress a model it was merged into")
        warned = input_warnings(base_ckpt, [task])
        plan = plan_merge(base_ckpt, [task], spectral_rank=functools.partial(stored_rank, rank=rank),
                          exclude=exclusions(exclude, preset), batch_bytes=batch_bytes)
        return be, target, base_ckpt, task, warned, plan

    be, target, base_ckpt, task, warned, plan = world.agree(planned)
    stored = task.infos()
    layout = tsvc_file.layout({n: (stored[n], tp.k) for n, tp in plan.tensors.items()})
    factored = {n: tp.info.shape for n, tp in plan.tensors.items() if tp.path == SPECTRAL}
    meta = tsvc_file.metadata(__version__, rank, factored, base_ckpt.fingerprint())
    mine = share_of(plan, split_by_cost(plan, plan.batches, world.size)[world.rank]) if world.size > 1 else plan

    def run(write):
        entries = {}
        for loaded in iter_batches(mine, be, mine.batches, "compress", progress, world=world):
            _compress_batch(loaded, plan, be, task, write, entries)
        entries = {n: e for part in world.gather(entries) for n, e in part.items()}
        return {**_compress_report({n: entries[n] for n in plan.tensors}, meta), "warnings": warned}

    if out is None:
        tensors = {}
        report = run(tensors.__setitem__)
        result = CompressedTask(DictCheckpoint(tensors, source="<compressed>"), meta)
        result.report = report
        return result
    writes = tsvc_file.layout({n: (stored[n], tp.k) for n, tp in mine.tensors.items()})
    with file_writer(target, layout, meta, world=world, writes=writes) as writer:
        report = run(writer.write)
    return {**report, "out": world.broadcast(target and target.path)}


def _compress_batch(loaded, plan, be, task, write, entries):
    names = loaded.batch.names
    if loaded.batch.path == COPY:
        for name in names:  # non-floating tensors are kept as the fine-tune has them
            write(name, task.read(name))
            entries[name] = {"path": "copy"}
        return
    tau = loaded.tau[:, 0]                                     # [L, *shape]
    dtypes = {name: task.infos()[name].dtype for name in names}
    if loaded.batch.path != SPECTRAL:
        for l, name in enumerate(names):
            write(name, tau[l].to(dtypes[name]).cpu())
            entries[name] = {"path": "dense", "numbers": tau[l].numel(), "dense_numbers": tau[l].numel()}
            if plan.tensors[name].note:
                entries[name]["note"] = plan.tensors[name].note
        return
    k = loaded.batch.k
    svd = be.task_svd(loaded.tau, None, k)
    total = tau.double().pow(2).flatten(1).sum(1)
    for l, name in enumerate(names):
        for factor_name, factor in zip(tsvc_file.factor_names(name), (svd.u[l, 0], svd.s[l, 0], svd.v[l, 0])):
            write(factor_name, factor.to(dtypes[name]).cpu())
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
               progress: bool | None = None, batch_bytes: int = DEFAULT_BATCH_BYTES, trust_pickle: bool = False,
               output_format: str = "model"):
    """Rebuild theta_i ~= theta_0 + U diag(s) V^T from a TSV-C task (dense tensors added back;
    non-floating tensors as the fine-tune stored them). With `out`, writes a model folder, with
    a base folder's config and tokenizer files carried over (`io.model_files`), replacing an
    existing one only with `overwrite=True`; with `output_format="peft"` as well, the task as a
    PEFT LoRA adapter folder (`to_adapter`)."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    if output_format == "peft" and out is None:
        raise ValueError("output format peft writes an adapter folder: pass out (-o)")
    target = None
    if out is not None:
        target = claim(out, folder=True, overwrite=overwrite, inputs=input_paths([base, compressed]))
    base_ckpt, (task,) = open_inputs(base, [compressed], trust_pickle)
    if not isinstance(task, CompressedTask):
        raise InputError(task.source, None, "is not a TSV-C file (written by tsvmerge compress)")
    if output_format == "peft":
        return to_adapter(task, base_ckpt, target, out_dtype=parse_dtype(out_dtype), base_model=_path_of(base))
    plan = plan_merge(base_ckpt, [task], batch_bytes=batch_bytes)
    out_dtype = parse_dtype(out_dtype)
    stored = task.infos()
    infos = {n: stored[n] if p.path == COPY else TensorInfo(p.info.shape, out_dtype or p.info.dtype)
             for n, p in plan.tensors.items()}
    # tau + base in fp32, or fp64 where the base holds fp64 tensors
    wide = any(i.dtype == torch.float64 for i in base_ckpt.infos().values())
    be = make_backend("reference", "cpu", "float64" if wide else "float32", 0, {})

    def run(write):
        for loaded in iter_batches(plan, be, plan.batches, "decompress", progress):
            for l, name in enumerate(loaded.batch.names):
                if loaded.batch.path == COPY:
                    write(name, task.read(name))
                else:
                    write(name, (loaded.base[l] + loaded.tau[l, 0]).to(infos[name].dtype))

    if out is None:
        tensors = {}
        run(tensors.__setitem__)
        return tensors
    with model_writer(target, infos, {"format": "pt", "tsvmerge": "decompressed"},
                      shard_size=DEFAULT_SHARD_SIZE) as writer:
        carried = carry_model_files(base, writer.folder)
        run(writer.write)
    return {"out": target.path, "tensors": len(infos), "carried": carried}


def to_adapter(task: CompressedTask, base: Checkpoint, target: Output, *, out_dtype=None,
               base_model: str | None = None) -> dict:
    """A TSV-C task as a PEFT LoRA adapter folder: each factored tensor a LoRA (`io.lora_writer`,
    layers taken as nn.Linear); every other floating tensor must equal the base's, or the task
    cannot be a LoRA and nothing is written."""
    infos = base.infos()
    names = sorted((n for n, i in infos.items() if i.dtype.is_floating_point), key=lambda n: n in task.shapes)
    with adapter_writer(target, {}, base_model) as writer:
        for name in names:  # the dense ones first: a refusal comes before any work
            factors = task.factors(name)
            writer.write(name, task.read(name) if factors is None else factors, out_dtype or infos[name].dtype)
            task.release()
    return {"out": target.path, "tensors": len(writer.ranks), "adapter": writer.summary()}

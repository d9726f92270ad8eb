"""STI analysis (`interference`): Singular Task Interference per spectral tensor, before and
after orthogonalisation, and the T x T task-pair overlaps users plot."""
from __future__ import annotations

import functools
import math

import torch

from .api import claim_distinct, exclusions, input_warnings, make_backend, open_inputs, task_list
from .distributed import World, join
from .engine import iter_batches, task_svds
from .io import claim, input_paths, publishing, write_json
from .io.publish import naming
from .methods.tsv import ORTHOGONALIZE, concatenated_factors, sti
from .options import optional, positive_int
from .plan import DEFAULT_BATCH_BYTES, SPECTRAL, merge_rank, plan_merge, share_of, split_by_cost
from .report import picture_format, plot_interference


def interference(base, finetuned, *, exclude=(), preset: str | None = None, backend: str = "auto",
                 device: str = "cpu", compute_dtype="float32", k: int | None = None,
                 orthogonalize: str = "procrustes", seed: int = 0, batch_bytes: int = DEFAULT_BATCH_BYTES,
                 progress: bool | None = None, report: str | None = None, plot: str | None = None,
                 overwrite: bool = False, trust_pickle: bool = False, distributed: bool = False, **options) -> dict:
    """STI per spectral tensor, before and after orthogonalisation, and the T x T task-pair
    overlaps ||U_i^T U_j||_F / sqrt(k) (likewise V; the diagonal is 1). `report` writes the
    JSON, `plot` a picture (its format from the extension: png, pdf, svg); an existing file is
    replaced only with `overwrite=True`. `options` are the backend's. `distributed=True` under
    torchrun: the tensors split across the processes, rank 0 writing the report and plot."""
    world, device = join(device) if distributed else (World(), device)

    def planned():
        k_ = optional(positive_int)(k)
        if orthogonalize not in ORTHOGONALIZE:
            raise ValueError(f"unknown orthogonalize={orthogonalize!r} (choose {' or '.join(ORTHOGONALIZE)})")
        be = make_backend(backend, device, compute_dtype, seed, options)
        tasks_given = task_list(finetuned)
        inputs = input_paths([base, *tasks_given])
        report_t = plot_t = plot_format = None
        if world.main:
            report_t, plot_t = (claim(p, folder=False, overwrite=overwrite, inputs=inputs) if p else None
                                for p in (report, plot))
            claim_distinct(report_t, plot_t)
            plot_format = plot_t and picture_format(plot_t.path)
        base_ckpt, tasks = open_inputs(base, tasks_given, trust_pickle)
        warned = input_warnings(base_ckpt, tasks)
        plan = plan_merge(base_ckpt, tasks, spectral_rank=functools.partial(merge_rank, T=len(tasks), k=k_),
                          exclude=exclusions(exclude, preset), batch_bytes=batch_bytes)
        return be, report_t, plot_t, plot_format, base_ckpt, tasks, warned, plan

    be, report_t, plot_t, plot_format, base_ckpt, tasks, warned, plan = world.agree(planned)
    T = len(tasks)
    spectral = [b for b in plan.batches if b.path == SPECTRAL]
    mine = share_of(plan, split_by_cost(plan, spectral, world.size)[world.rank] if world.size > 1 else spectral)
    out = {}
    for loaded in iter_batches(mine, be, mine.batches, "interference", progress, world=world):
        f = concatenated_factors(loaded.tau, loaded.batch.k, be, task_svds(loaded, be))
        before = sti(f.gu, f.s, f.gv)
        uo, vo = (be.polar(x, orthogonalize, g) for x, g in ((f.u, f.gu), (f.v, f.gv)))
        after = sti(be.factor_gram(uo), f.s, be.factor_gram(vo))
        overlap_u, overlap_v = (pair_overlap(g, T, f.k) for g in (f.gu, f.gv))
        for l, name in enumerate(loaded.batch.names):
            out[name] = {"k": f.k, "sti": float(before[l]), "sti_orthogonalized": float(after[l]),
                         "overlap_u": overlap_u[l].tolist(), "overlap_v": overlap_v[l].tolist()}
    world.barrier()
    out = {n: e for part in world.gather(out) for n, e in part.items()}
    rep = {"tasks": [t.source for t in tasks], "base": base_ckpt.source, "orthogonalize": orthogonalize,
           "backend": be.describe(), "warnings": warned, "tensors": {n: out[n] for n in plan.tensors if n in out}}

    def publish():
        with publishing(report_t, plot_t) as (report_tmp, plot_tmp):
            if report_tmp:
                write_json(report_tmp, rep)
            if plot_tmp:
                with naming(plot_tmp):
                    plot_interference(rep, plot_tmp, plot_format)

    world.agree(publish, main_only=True)
    return rep


def pair_overlap(g: torch.Tensor, T: int, k: int) -> torch.Tensor:
    """[L, Tk, Tk] Gram -> [L, T, T] block Frobenius norms / sqrt(k)."""
    L = g.shape[0]
    return torch.linalg.matrix_norm(g.reshape(L, T, k, T, k).transpose(2, 3)) / math.sqrt(k)

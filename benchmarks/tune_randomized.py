"""Captured energy, its bound and the passes of the torch backend's randomized SVD, against the
exact SVD, on synthetic zoos of every spectrum family and on the accuracy benchmark's real fine-tunes.

    python benchmarks/tune_randomized.py                     # the committed table (about 15 min on 2 cores)
    python benchmarks/tune_randomized.py --zoos ViT-B-32:8:2 --spectra flatfloor --targets 0.995 0.999

For every zoo and setting, per spectral task matrix (DESIGN section 6):
- captured energy, exactly: kept sum s^2 / exact top-k sum s^2 (min and mean over the matrices);
- the backend's bound on it (`TaskSVD.energy`): its min, and its gap to the truth (truth - bound,
  min and mean; a negative min would be a bound that reads above the truth);
- passes over each task matrix (mean and max) and how many matrices stopped at the cap;
- the CPU time of `task_svd` (process time, all threads; the least of `--repeats` runs, as other jobs
  share the machine), and that of the exact singular values of the same matrices.
Settings: `fixed` is energy_target=None (the fixed schedule: block Krylov, q = 1, p = 10); every
`--targets` value is an adaptive run with the defaults otherwise. `--exact-rho` adds, per target, a
diagnostic run whose bound uses the residual's norm computed exactly (an SVD per stage, slow) in
place of the probe's estimate and its margin: the passes the bound's form needs with a perfect rho.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from collections import defaultdict

import torch

from recording import RESULTS, Record, least, repeated, timed

from tsvmerge.backends import get_backend, krylov, lapack
from tsvmerge.zoo import SPECTRA, make_zoo_dicts

REAL_CACHE = os.path.join("~", ".cache", "tsvmerge", "accuracy")


def shape_groups(base, tasks):
    """[(k, tau [L, T, m, n])] per shape of the 2-D tensors (the spectral path)."""
    names = defaultdict(list)
    for name, t in base.items():
        if t.dim() == 2:
            names[tuple(t.shape)].append(name)
    groups = []
    for shape, group in names.items():
        tau = torch.stack([torch.stack([ft[n].float() - base[n].float() for ft in tasks]) for n in group])
        groups.append((min(shape) // len(tasks), tau))
    return groups


def synthetic(spec: str, spectrum: str, seed: int = 0):
    """ARCH:T:LAYERS -> (label, base, fine-tunes)."""
    arch, tasks, layers = spec.split(":")
    base, finetuned = make_zoo_dicts(arch, int(tasks), int(layers), seed=seed, spectrum=spectrum)
    return f"{arch} x{tasks}, {layers} block(s){f', seed {seed}' if seed else ''}", spectrum, base, finetuned


def real(cache: str, tasks: int):
    """The accuracy benchmark's hard zoo (measured below): its first `tasks` fine-tunes, trained if not cached."""
    from tsvmerge.accuracy.__main__ import ZOOS
    from tsvmerge.accuracy.checkpoints import load_or_build
    from tsvmerge.accuracy.data import TASKS, load_splits
    zoo = load_or_build(cache, list(TASKS[:tasks]), *ZOOS["hard"], load_splits())
    names = [t.name for t in TASKS[:tasks]]
    return "accuracy-benchmark ViT", f"real x{tasks}", zoo.pretrained, [zoo.finetuned[n] for n in names]


@contextlib.contextmanager
def exact_rho():
    """The adaptive bound with ||A (I - PP^T)||_2^2 computed exactly (and no margin): a diagnostic."""
    seen = {}
    stage, residual_norm = krylov._krylov_stage, krylov._residual_norm

    def remember(be, mats, rows, kr):
        seen["mats"], seen["rows"] = mats, rows
        return stage(be, mats, rows, kr)

    def exact(be, kr, fit):
        mats = seen["mats"]
        base = 0 if mats.base is None else mats.base.double().unsqueeze(1)
        a = (mats.finetuned.double() - base).flatten(0, 1)[seen["rows"]]
        if a.shape[-2] > a.shape[-1]:
            a = a.mT
        p = torch.linalg.qr(torch.cat(kr.bts, -1).double())[0]
        rho = torch.linalg.matrix_norm(a - (a @ p) @ p.mT, ord=2) ** 2
        return rho / krylov.RHO_MARGIN[len(kr.qs) > 1]

    krylov._krylov_stage, krylov._residual_norm = remember, exact
    try:
        yield
    finally:
        krylov._krylov_stage, krylov._residual_norm = stage, residual_norm


def evaluate(groups, exact, settings, repeats):
    """One row per setting: true energy, bound, gap, passes, time."""
    rows = []
    for label, options in settings:
        options = dict(options)
        if options.pop("exact_rho", False):
            with exact_rho():
                rows += evaluate(groups, exact, [(label, options)], 1)
            continue
        backend = get_backend("torch", **options)
        true, bound, passes, capped, seconds = [], [], [], 0, 0.0
        for (k, tau), top in zip(groups, exact):
            svd, t = timed(backend.task_svd, tau, None, k)
            seconds += least([t] + repeated(lambda: backend.task_svd(tau, None, k), repeats - 1)).cpu_s
            true.append(((svd.s.double() ** 2).sum(-1) / top).flatten())
            bound.append(svd.energy.double().flatten())
            if svd.passes is not None:     # None: the exact SVD (the sketch would span the short side)
                passes.append(svd.passes.double().flatten())
            capped += int(svd.capped.sum()) if svd.capped is not None else 0
        true, bound = torch.cat(true), torch.cat(bound)
        passes = torch.cat(passes) if passes else torch.zeros(1)
        gap = true - bound
        rows.append({"setting": label, "matrices": true.numel(), "energy_min": float(true.min()),
                     "energy_mean": float(true.mean()), "bound_min": float(bound.min()),
                     "gap_min": float(gap.min()), "gap_mean": float(gap.mean()), "passes_mean": float(passes.mean()),
                     "passes_max": int(passes.max()), "capped": capped, "cpu_s": seconds})
        print(format_row(rows[-1]), flush=True)
    return rows


HEADER = ("| setting | energy min | energy mean | bound min | truth - bound (min / mean) | passes (mean / max) "
          "| capped | CPU s |")


def format_row(r):
    return (f"| {r['setting']} | {r['energy_min']:.5f} | {r['energy_mean']:.5f} | {r['bound_min']:.5f} | "
            f"{r['gap_min']:+.1e} / {r['gap_mean']:.5f} | {r['passes_mean']:.2f} / {r['passes_max']} | "
            f"{r['capped']} of {r['matrices']} | {r['cpu_s']:.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoos", nargs="*", default=["ViT-B-32:8:2", "ViT-L-14:20:1"], metavar="ARCH:T:LAYERS")
    ap.add_argument("--spectra", nargs="+", default=list(SPECTRA), choices=SPECTRA)
    ap.add_argument("--real-tasks", nargs="*", type=int, default=[8, 12],
                    help="task counts of the accuracy benchmark's real fine-tunes to add (none: skip them)")
    ap.add_argument("--real-cache", default=REAL_CACHE, help="the accuracy benchmark's checkpoint cache")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="zoo seeds of the synthetic zoos")
    ap.add_argument("--targets", nargs="+", type=float, default=[0.995])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting and tensor (the least counts)")
    ap.add_argument("--exact-rho", action="store_true", help="add a diagnostic run per target with the exact residual norm")
    ap.add_argument("--results", default=RESULTS)
    args = ap.parse_args()

    record = Record("tune_randomized", "cpu", args.results)
    settings = [("fixed (q = 1)", {"energy_target": None})] + [(f"target {t:g}", {"energy_target": t}) for t in args.targets]
    if args.exact_rho:
        settings += [(f"target {t:g}, exact rho", {"energy_target": t, "exact_rho": True}) for t in args.targets]
    sources = [lambda z=z, s=s, seed=seed: synthetic(z, s, seed) for z in args.zoos for s in args.spectra
               for seed in args.seeds]
    sources += [lambda t=t: real(args.real_cache, t) for t in args.real_tasks]
    zoos = []
    for source in sources:
        label, spectrum, base, finetuned = source()
        groups = shape_groups(base, finetuned)
        del base, finetuned
        exact, t_ref = [], 0.0
        for k, tau in groups:
            with lapack.serial_lapack(tau):      # threaded LAPACK on a busy machine: 20x slower, seen here
                s, t = timed(torch.linalg.svdvals, tau.double())
            exact.append((s[..., :k] ** 2).sum(-1))
            t_ref += t.cpu_s
        print(f"\n{label}, {spectrum}: exact singular values {t_ref:.1f} CPU s\n{HEADER}", flush=True)
        zoos.append({"zoo": label, "spectrum": spectrum, "exact_cpu_s": t_ref, "rows": evaluate(groups, exact, settings, args.repeats)})
    write(record, args, zoos)


def write(record, args, zoos):
    lines = ["Energy: kept sum s^2 / exact top-k sum s^2 per spectral task matrix, exact. Bound: the backend's "
             "`energy` (TaskSVD.energy, the report's `energy`); truth - bound < 0 would be a bound above the truth. "
             "Passes: products with each task matrix. Capped: matrices that stopped at max_passes below the target. "
             f"CPU s: process time of task_svd over all spectral tensors on {os.cpu_count()} CPUs, the least of "
             f"{args.repeats} runs.", ""]
    for zoo in zoos:
        lines += [f"## {zoo['zoo']}, {zoo['spectrum']}", "", HEADER, "|" + "---|" * (HEADER.count("|") - 1),
                  *[format_row(r) for r in zoo["rows"]], ""]
    record.write({"args": vars(args), "zoos": zoos}, "Randomized SVD: captured energy, its bound and passes", lines)


if __name__ == "__main__":
    main()

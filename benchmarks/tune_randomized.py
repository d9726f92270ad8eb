"""Tune the torch backend's randomized SVD: range finder, iterations q and oversampling p.

    python benchmarks/tune_randomized.py                      # ViT-B-32 shapes, 1 block, T = 8 and 20
    python benchmarks/tune_randomized.py --layers 2 --methods krylov --power-iters 1 2 --oversample 10

For every zoo (spectrum x T) and setting, against the exact reference on the same task
matrices, it measures (DESIGN section 6):
- captured energy, exactly: kept sum s^2 / exact top-k sum s^2 per task matrix (min and
  mean over every tensor and task);
- the backend's own estimate of that ratio (`TaskSVD.energy`): its min, and its largest
  error against the exact ratio (positive: the estimate is optimistic);
- the merged update's relative difference from the reference's, max over tensors
  (both orthogonalised the same way, so only the task SVD differs);
- the CPU time of `task_svd` over the whole zoo (process time, all threads: steadier than
  wall time on a shared machine), with the energy estimate, and without it when
  `--time-without-estimate` is given.

Range finders (`--methods`): `krylov`, the backend's block Krylov (Musco & Musco 2015), and
`power`, subspace iteration; both make 2q + 2 passes over the task matrices.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections import defaultdict

import torch

from tsvmerge import primitives as P
from tsvmerge.backends import get_backend
from tsvmerge.zoo import SPECTRA, make_zoo_dicts

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGET_ENERGY = 0.995


def shape_groups(base, tasks):
    """[(k, tau [L, T, m, n])] per shape of the 2-D tensors (the spectral path)."""
    names = defaultdict(list)
    for name, t in base.items():
        if t.dim() == 2:
            names[tuple(t.shape)].append(name)
    groups = []
    for shape, group in names.items():
        tau = torch.stack([torch.stack([ft[n] - base[n] for ft in tasks]) for n in group])
        groups.append((min(shape) // len(tasks), tau))
    return groups


def merged_update(u, s, v):
    """TSV-M's Delta = U_perp diag(s) V_perp^T from per-task factors [L, T, ., k], in fp64.

    Orthogonalised by whitening, U (U^T U)^(-1/2): the polar factor when U has full column
    rank (it does on these zoos), at a fraction of the cost of an SVD of U.
    """
    def orthogonal(x):
        return P.whiten(x.double().permute(0, 2, 1, 3).flatten(2))
    zeros = torch.zeros(u.shape[0], u.shape[2], v.shape[2], dtype=torch.float64)
    return P.lowrank_apply(zeros, orthogonal(u), s.flatten(1), orthogonal(v), 1.0, torch.float64)


def timed(fn, *args):
    start = time.process_time()
    out = fn(*args)
    return out, time.process_time() - start


def evaluate(groups, exact, settings, time_without_estimate):
    """One row per setting: exact and estimated energy, weight difference, time."""
    rows = []
    for method, q, p in settings:
        ratios, estimates, diffs, t_est, t_plain = [], [], [], 0.0, 0.0
        for (k, tau), (ref, ref_delta) in zip(groups, exact):
            opts = dict(krylov=method == "krylov", power_iters=q, oversample=p)
            svd, t = timed(get_backend("torch", energy_estimate=True, **opts).task_svd, tau, None, k)
            t_est += t
            if time_without_estimate:
                t_plain += timed(get_backend("torch", energy_estimate=False, **opts).task_svd, tau, None, k)[1]
            u, s, v, est = svd.u, svd.s, svd.v, svd.energy
            ratio = (s.double() ** 2).sum(-1) / (ref.s.double() ** 2).sum(-1)
            ratios.append(ratio.flatten())
            estimates.append((est.double().flatten(), ratio.flatten()))
            delta = merged_update(u, s, v)
            diffs.append((delta - ref_delta).flatten(1).norm(dim=1) / ref_delta.flatten(1).norm(dim=1))
        ratio, diff = torch.cat(ratios), torch.cat(diffs)
        row = {"method": method, "power_iters": q, "oversample": p,
               "energy_min": float(ratio.min()), "energy_mean": float(ratio.mean()),
               "weight_rel_max": float(diff.max()), "weight_rel_mean": float(diff.mean()),
               "time_s": t_est, "time_s_no_estimate": t_plain if time_without_estimate else None}
        est, true = (torch.cat(x) for x in zip(*estimates))
        row.update(estimate_min=float(est.min()), estimate_max_error=float((est - true).max()),
                   estimate_min_error=float((est - true).min()))
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = ("| method | q | p | passes | energy min | energy mean | estimate min | estimate error (min..max) | "
          "weight rel diff max | CPU s (with estimate) | CPU s (no estimate) |")


def passes(q: int) -> int:
    """Products with every task matrix: sketch, 2 per iteration, and B = Q^T A."""
    return 2 * q + 2


def format_row(r):
    est = f"{r['estimate_min']:.4f}"
    err = f"{r['estimate_min_error']:+.4f}..{r['estimate_max_error']:+.4f}"
    plain = "-" if r["time_s_no_estimate"] is None else f"{r['time_s_no_estimate']:.2f}"
    return (f"| {r['method']} | {r['power_iters']} | {r['oversample']} | {passes(r['power_iters'])} | {r['energy_min']:.5f} | {r['energy_mean']:.5f} | "
            f"{est} | {err} | {r['weight_rel_max']:.2e} | {r['time_s']:.2f} | {plain} |")


def recommend(zoos) -> str:
    """The cheapest setting that meets the energy target on every zoo.

    Cost is ranked by passes over the task matrices, then p, then block Krylov first (its
    Rayleigh-Ritz step is on 2c columns, not c): timings on a shared 2-core machine are
    too noisy to rank by, and the work is passes x (k + p) columns with p << k.
    """
    ok = defaultdict(lambda: True)
    for zoo in zoos:
        for r in zoo["rows"]:
            ok[r["power_iters"], r["oversample"], r["method"] != "krylov"] &= r["energy_min"] >= TARGET_ENERGY
    passing = sorted(key for key, good in ok.items() if good)  # (q, p, power?): passes grow with q
    if not passing:
        return f"no setting reached energy >= {TARGET_ENERGY} on every tensor"
    q, p, power = passing[0]
    return (f"cheapest setting with captured energy >= {TARGET_ENERGY} on every task matrix of every zoo: "
            f"{'power' if power else 'krylov'}, power_iters={q}, oversample={p} ({passes(q)} passes over the task "
            "matrices; the energy estimate rides along them)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--tasks", nargs="+", type=int, default=[8, 20])
    ap.add_argument("--spectra", nargs="+", default=list(SPECTRA), choices=SPECTRA)
    ap.add_argument("--methods", nargs="+", default=["krylov", "power"], choices=["krylov", "power"])
    ap.add_argument("--power-iters", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--oversample", nargs="+", type=int, default=[5, 10, 20])
    ap.add_argument("--time-without-estimate", action="store_true",
                    help="also time each setting with energy_estimate=False (a second run)")
    ap.add_argument("--results", default=RESULTS)
    args = ap.parse_args()

    settings = [(m, q, p) for m in args.methods for q in args.power_iters for p in args.oversample]
    zoos = []
    for spectrum in args.spectra:
        for tasks in args.tasks:
            base, finetuned = make_zoo_dicts(args.arch, tasks, args.layers, spectrum=spectrum)
            groups = shape_groups(base, finetuned)
            del base, finetuned
            reference = get_backend("reference")
            exact, t_ref = [], 0.0
            for k, tau in groups:
                ref, t = timed(reference.task_svd, tau, None, k)
                t_ref += t
                exact.append((ref, merged_update(ref.u, ref.s, ref.v)))
            print(f"\n{args.arch} x{tasks}, {args.layers} block(s), {spectrum}: reference task_svd {t_ref:.1f} CPU s\n{HEADER}")
            zoos.append({"spectrum": spectrum, "tasks": tasks, "reference_time_s": t_ref,
                         "rows": evaluate(groups, exact, settings, args.time_without_estimate)})
            del groups, exact
    summary = recommend(zoos)
    print("\n" + summary)
    write(args, zoos, summary)


def write(args, zoos, summary):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "nogit"
    stem = os.path.join(args.results, f"tune_randomized-cpu{os.cpu_count()}-{commit}")
    os.makedirs(args.results, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"args": vars(args), "zoos": zoos, "summary": summary}, f, indent=1)
    lines = [f"# Randomized SVD tuning: {args.arch}, {args.layers} block(s), commit {commit}", "",
             "Passes: products with every task matrix (2q + 2; the energy estimate rides along them). "
             "Energy: kept sum s^2 / exact top-k sum s^2 per task matrix (target >= "
             f"{TARGET_ENERGY}). Estimate error: backend estimate minus exact ratio (negative: conservative). "
             "Weight rel diff: ||Delta_fast - Delta_exact||_F / ||Delta_exact||_F of the merged update, max over "
             "tensors (meaningful on the gapped zoos, DESIGN section 6). CPU s: process time of task_svd over all spectral tensors "
             f"of the zoo on {os.cpu_count()} CPUs; load average at the end {[round(x, 1) for x in os.getloadavg()]}.", ""]
    for zoo in zoos:
        lines += [f"## {zoo['spectrum']}, T = {zoo['tasks']} (reference task_svd {zoo['reference_time_s']:.1f} CPU s)", "",
                  HEADER, "|" + "---|" * (HEADER.count("|") - 1), *[format_row(r) for r in zoo["rows"]], ""]
    lines.append(f"**{summary}**")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()

"""End-to-end merge throughput and memory over synthetic zoos (TSV-M, or any `--methods`).

    python benchmarks/throughput.py                       # B-32/B-16/L-14 x 8/14/20, both backends
    python benchmarks/throughput.py --archs ViT-B-32 --tasks 8 --in-memory
    python benchmarks/throughput.py --archs ViT-B-32 --tasks 8 --in-memory --layers 2 --methods tsv iso_c iso_cts

Every configuration (arch, tasks, backend, source) runs in its own child process
(`--one CONFIG`), so its peak RSS is its own: the parent reads it from `os.wait4`. Results go
to benchmarks/results/throughput-<device>-<commit>-<time>.{json,md}.

The exact `reference` backend is slow, so by default it merges only the first
`--reference-layers` blocks of each zoo (same tensors as the full zoo: zoo.py seeds each
tensor by name) and its wall time is scaled up by spectral bytes, full model over measured
(equivalently: its GB/s is assumed constant across layers). The tables say which rows are
scaled.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

from recording import RESULTS, Record, evict, spawn, timer

FP32 = 4


def spectral_numel(arch: str, layers: int | None) -> int:
    """Elements of the 2-D (spectral-path) tensors of a zoo model: the work TSV-M's SVDs do."""
    from tsvmerge.zoo import model_shapes
    return sum(m * n for m, n in (s for s in model_shapes(arch, layers).values() if len(s) == 2))


def model_bytes(arch: str, layers: int | None) -> int:
    from tsvmerge.zoo import model_shapes
    total = 0
    for shape in model_shapes(arch, layers).values():
        numel = 1
        for d in shape:
            numel *= d
        total += numel * FP32
    return total


# -- one configuration, in a child process ---------------------------------------------
def run_one(cfg: dict) -> dict:
    import psutil
    import torch

    import tsvmerge
    from tsvmerge.zoo import Arch, make_zoo_dicts

    options = {k: cfg[k] for k in ("power_iters", "oversample") if cfg.get(k) is not None and cfg["backend"] != "reference"}
    if cfg.get("energy_target", "default") != "default":
        options["energy_target"] = None if cfg["energy_target"] == "none" else float(cfg["energy_target"])
    merge_args = dict(method=cfg.get("method", "tsv"), backend=cfg["backend"], device=cfg["device"], progress=False, **options)
    # Warm up library code paths (LAPACK, CUDA context) on a tiny model outside the timing.
    tiny = Arch("warmup", width=64, layers=1, patch=16, image=64, output_dim=32)
    tsvmerge.merge(*make_zoo_dicts(tiny, cfg["tasks"]), **merge_args)

    work = tempfile.mkdtemp(prefix="tsvmerge-bench-", dir=cfg["scratch"])
    try:
        if cfg["source"] == "memory":
            base, finetuned = make_zoo_dicts(cfg["arch"], cfg["tasks"], cfg["layers"], spectrum=cfg["spectrum"])
        else:
            base, finetuned = cfg["zoo"]["base"], cfg["zoo"]["finetuned"]
            evict([base] + finetuned)
        rss_before = psutil.Process().memory_info().rss
        if cfg["device"].startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with timer(cfg["device"]) as t:
            if cfg["source"] == "memory":
                report_path = os.path.join(work, "report.json")
                tsvmerge.merge(base, finetuned, report=report_path, **merge_args)
            else:
                tsvmerge.merge(base, finetuned, out=os.path.join(work, "merged"), **merge_args)
                report_path = os.path.join(work, "merged", "tsvmerge_report.json")
        with open(report_path) as f:
            report = json.load(f)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    entries = report["tensors"].values()
    energies = [e["energy"] for e in entries if "energy" in e]
    passes = [e["passes"] for e in entries if "passes" in e]
    return {
        "mean_passes": sum(passes) / len(passes) if passes else None,
        "capped": len(report["summary"].get("capped", {})),
        "wall_s": t.wall_s,
        "cpu_s": t.cpu_s,
        "rss_before_merge_gb": rss_before / 1e9,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if cfg["device"].startswith("cuda") else None,
        "spectral_tensors": sum(e["path"] == "spectral" for e in entries),
        "min_energy": min(energies) if energies else None,
        "mean_energy": sum(energies) / len(energies) if energies else None,
        "backend_ran": report["backend"],
    }


# -- the sweep ------------------------------------------------------------------------
def sweep(args) -> list[dict]:
    import psutil
    from tsvmerge.zoo import ARCHS, make_zoo

    rows = []
    zoo_root = tempfile.mkdtemp(prefix="tsvmerge-zoos-", dir=args.scratch)
    try:
        for arch in args.archs:
            full_layers = args.layers if args.layers is not None else ARCHS[arch].layers
            for tasks in args.tasks:
                for source in args.sources:
                    zoos = {}  # layer count -> Zoo, shared by the backends
                    for method, backend, target in [(m, b, t) for m in args.methods for b in args.backends
                                                    for t in (["default"] if b == "reference" else args.energy_targets)]:
                        layers = full_layers
                        if backend == "reference" and args.reference_layers:
                            layers = min(full_layers, args.reference_layers)
                        row = {"arch": arch, "tasks": tasks, "method": method, "backend": backend, "source": source,
                               "device": args.device, "layers": layers, "full_layers": full_layers,
                               "spectrum": args.spectrum, "energy_target": target}
                        input_bytes = (tasks + 1) * model_bytes(arch, layers)
                        if source == "memory" and input_bytes > 0.8 * psutil.virtual_memory().available:
                            row["skipped"] = f"in memory needs {input_bytes / 1e9:.1f} GB of inputs resident"
                        elif source == "disk" and input_bytes > 0.9 * shutil.disk_usage(args.scratch).free:
                            row["skipped"] = f"zoo needs {input_bytes / 1e9:.1f} GB of disk"
                        else:
                            cfg = {**row, "scratch": args.scratch, "power_iters": args.power_iters,
                                   "oversample": args.oversample}
                            if source == "disk":
                                if layers not in zoos:
                                    folder = os.path.join(zoo_root, f"{arch}-T{tasks}-L{layers}")
                                    zoos[layers] = make_zoo(folder, arch, tasks, layers, spectrum=args.spectrum)
                                cfg["zoo"] = {"base": zoos[layers].base, "finetuned": zoos[layers].finetuned}
                            row.update(spawn(__file__, cfg))
                            if "wall_s" in row:
                                measured = tasks * FP32 * spectral_numel(arch, layers)
                                scale = spectral_numel(arch, full_layers) / spectral_numel(arch, layers)
                                row.update(task_vector_gb=measured / 1e9, gbps=measured / 1e9 / row["wall_s"],
                                           wall_s_full=row["wall_s"] * scale, scaled=scale != 1.0)
                        rows.append(row)
                        print(format_row(row), flush=True)
                    for zoo in zoos.values():
                        shutil.rmtree(os.path.dirname(zoo.base), ignore_errors=True)
    finally:
        shutil.rmtree(zoo_root, ignore_errors=True)
    return rows


# -- output ---------------------------------------------------------------------------
HEADER = ("| arch | T | method | backend | source | layers run/full | wall s (run) | CPU s (run) | wall s (full model) | "
          "task-vector GB/s | peak RSS GB | peak GPU GB | min / mean energy | passes (mean) | capped |")


def backend_label(r: dict) -> str:
    target = r.get("energy_target", "default")
    return r["backend"] if target == "default" else f"{r['backend']} (energy_target {target})"


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_row(r: dict) -> str:
    lead = f"| {r['arch']} | {r['tasks']} | {r.get('method', 'tsv')} | {backend_label(r)} | {r['source']} | {r['layers']}/{r['full_layers']} |"
    if "wall_s" not in r:
        return lead + f" {r.get('skipped') or r.get('error')} | | | | | | | | |"
    scaled = " (scaled)" if r["scaled"] else ""
    return (lead + f" {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['wall_s_full']:.2f}{scaled} | {r['gbps']:.3f} | {r['peak_rss_gb']:.2f} | "
            f"{fmt(r['peak_gpu_gb'], '.2f')} | {fmt(r['min_energy'], '.4f')} / {fmt(r['mean_energy'], '.4f')} | "
            f"{fmt(r.get('mean_passes'), '.2f')} | {r.get('capped', '-')} |")


def speedups(rows: list[dict]) -> list[str]:
    """reference / torch full-model wall time per (arch, T, source, method)."""
    lines = []
    done = {(r["arch"], r["tasks"], r["source"], r.get("method", "tsv"), backend_label(r)): r for r in rows if "wall_s" in r}
    for (arch, tasks, source, method, backend), fast in done.items():
        ref = done.get((arch, tasks, source, method, "reference"))
        if backend != "reference" and ref:
            lines.append(f"| {arch} | {tasks} | {source} | {method} | {backend} | "
                         f"{ref['wall_s_full'] / fast['wall_s_full']:.1f}x |")
    return lines


def write_results(rows, args, record: Record) -> str:
    m = record.meta
    lines = [f"Zoo spectrum `{args.spectrum}`.", "",
             "- wall s: the `tsvmerge.merge` call only (zoo generation and library warm-up excluded). "
             "From disk: safetensors in, merged model folder out, inputs evicted from the page cache first. "
             "In memory: state dicts in, state dict out.",
             "- CPU s: process CPU time (all threads) during the call: on a shared, loaded machine "
             "it is steadier than wall time.",
             "- task-vector GB/s: T x fp32 bytes of the 2-D (spectral) tensors / wall.",
             f"- reference rows run on the first {args.reference_layers} blocks; their full-model wall time is "
             "scaled by spectral bytes (marked `scaled`)." if args.reference_layers else "- every row ran on the full model.",
             "- peak RSS: the child process's ru_maxrss, including the zoo itself when in memory.",
             "- energy: the torch backend's bound on captured top-k energy (1.0 for exact), min / mean over tensors; "
             "passes: products with each task matrix, mean over spectral tensors; capped: tensors that stopped at "
             "max_passes below the energy target.",
             "", HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    lines += [format_row(r) for r in rows]
    speed = speedups(rows)
    if speed:
        lines += ["", "Speed-up over the exact reference (full-model wall times):", "",
                  "| arch | T | source | method | backend | speed-up |", "|---|---|---|---|---|---|", *speed]
    return record.write({"rows": rows}, f"Merge throughput ({', '.join(args.methods)}): {m['device_label']}, commit {m['commit']}", lines)


def parse(argv=None):
    from tsvmerge.methods import METHODS
    from tsvmerge.zoo import ARCHS, SPECTRA
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", metavar="CONFIG", help=argparse.SUPPRESS)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--tasks", nargs="+", type=int, default=[8, 14, 20])
    p.add_argument("--backends", nargs="+", default=["reference", "torch"])
    p.add_argument("--methods", nargs="+", default=["tsv"], choices=sorted(METHODS),
                   help="merge methods, each run on every backend (default: %(default)s)")
    p.add_argument("--layers", type=int, help="blocks per model (default: the arch's own)")
    p.add_argument("--reference-layers", type=int, default=2,
                   help="blocks the reference runs on, scaled up to the full model (0: all)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--from-disk", dest="sources", action="store_const", const=["disk"])
    src.add_argument("--in-memory", dest="sources", action="store_const", const=["memory"])
    p.set_defaults(sources=["memory", "disk"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--spectrum", default="powerlaw", choices=SPECTRA)
    p.add_argument("--power-iters", type=int, help="torch backend option (default: the backend's)")
    p.add_argument("--oversample", type=int, help="torch backend option (default: the backend's)")
    p.add_argument("--energy-targets", nargs="+", default=["default"], metavar="TARGET",
                   help="torch backend energy_target values, one run each: a fraction, 'none' (the fixed "
                   "schedule) or 'default' (default: %(default)s)")
    p.add_argument("--scratch", default=tempfile.gettempdir(), help="where zoos and merged outputs go")
    p.add_argument("--results", default=RESULTS)
    return p.parse_args(argv)


def main():
    args = parse()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    record = Record("throughput", args.device, args.results)
    print(HEADER, flush=True)
    rows = sweep(args)
    write_results(rows, args, record)
    print("\n".join(speedups(rows)))


if __name__ == "__main__":
    main()

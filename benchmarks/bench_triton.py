"""Benchmark the Triton kernels against their floors and their torch references on one GPU.

Shapes are ViT-L-14 x 20 tasks: c_fc 4096x1024, in_proj 3072x1024, out_proj 1024x1024 and
c_proj 1024x4096, 24 layers each, sketch width c = k + p (k = 1024 // 20 = 51, p = 10). For
every kernel: its time, the memory floor (bytes it must move / peak bandwidth), the compute
floor (flops / peak rate), the torch reference's time on the same inputs (both the median of
`--repeat` timed runs after an untimed one, which autotunes and compiles), and the autotuned config
chosen. Writes benchmarks/results/bench_triton-<device>-<commit>-<time>.{json,md}.

    python benchmarks/bench_triton.py [--layers 24] [--tasks 20] [--dtype fp32] [--tf32]
"""
from __future__ import annotations

import argparse
import sys

import torch

from recording import RESULTS, Record, median, repeated
VIT_L14 = {"c_fc": (4096, 1024), "in_proj": (3072, 1024), "out_proj": (1024, 1024), "c_proj": (1024, 4096)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense peaks by device name (first match wins): HBM GB/s, fp32 CUDA-core TFLOP/s, TF32 tensor-core TFLOP/s.
PEAKS = [("H200", 4800, 67, 495), ("H100 NVL", 3900, 60, 418), ("H100 PCIe", 2000, 51, 378),
         ("H100", 3350, 67, 495), ("A100", 2039, 19.5, 156)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24, help="layers per shape group (default 24)")
    parser.add_argument("--tasks", type=int, default=20, help="tasks T (default 20); k = min(m, n) // T")
    parser.add_argument("--oversample", type=int, default=10, help="p in c = k + p (default 10)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the checkpoints (default fp32)")
    parser.add_argument("--tf32", action="store_true", help="TF32 dots in the kernels (default: ieee fp32)")
    parser.add_argument("--shapes", nargs="+", choices=VIT_L14, default=list(VIT_L14), help="shape groups to run")
    parser.add_argument("--peak-gbps", type=float, help="override the device's peak memory bandwidth (GB/s)")
    parser.add_argument("--peak-tflops", type=float, help="override the device's peak rate for the dot precision")
    parser.add_argument("--repeat", type=int, default=20, help="timed runs of each kernel (median; default 20)")
    parser.add_argument("--out", default=RESULTS, help=f"results folder (default {RESULTS})")
    return parser.parse_args(argv)


def device_peaks(name: str, args) -> tuple[float | None, float | None]:
    """(bytes/s, flop/s) for the floors; None where the device is unknown and not overridden."""
    gbps = tflops = None
    for key, bw, fp32, tf32 in PEAKS:
        if key in name:
            gbps, tflops = bw, tf32 if args.tf32 else fp32
            break
    gbps, tflops = args.peak_gbps or gbps, args.peak_tflops or tflops
    return (gbps and gbps * 1e9), (tflops and tflops * 1e12)


def config_str(config) -> str:
    return ", ".join([f"{k}={v}" for k, v in config.kwargs.items()]
                     + [f"warps={config.num_warps}", f"stages={config.num_stages}"])


def rel_err(actual, expected) -> float:
    expected = expected.float()
    return float((actual.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def shape_group(name, m, n, args, peaks):
    """One row per kernel for an L x T group of m x n task matrices."""
    from tsvmerge import primitives as P
    from tsvmerge.kernels.triton import delta_sketch as D
    from tsvmerge.kernels.triton import gram as G
    from tsvmerge.kernels.triton import lowrank_apply as LA

    L, T, dtype = args.layers, args.tasks, DTYPES[args.dtype]
    k = min(m, n) // T
    c, K = min(k + args.oversample, m, n), T * k
    precision = "tf32" if args.tf32 else "ieee"
    size = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)

    base = randn(L, m, n, dtype=dtype)
    finetuned = (base.unsqueeze(1) + 0.01 * randn(L, T, m, n, dtype=dtype)).to(dtype)
    matrices = L * T * m * n * size  # the task matrices; base adds L * m * n * size
    rows = []

    def row(kernel, ours, reference, bytes_, flops, autotuned):
        triton_out = ours()
        torch_out = reference()
        triton_ms, torch_ms = (median(repeated(fn, args.repeat, "cuda", warmup=1)).wall_s * 1e3
                               for fn in (ours, reference))
        bw, rate = peaks
        floors = {"memory_ms": bw and bytes_ / bw * 1e3, "compute_ms": rate and flops / rate * 1e3}
        floor = max((f for f in floors.values() if f), default=None)
        rows.append({"shape": name, "m": m, "n": n, "kernel": kernel, "triton_ms": triton_ms, "torch_ms": torch_ms,
                     "speedup": torch_ms / triton_ms, **floors, "fraction_of_floor": floor and floor / triton_ms,
                     "bytes": bytes_, "flops": flops, "rel_err": rel_err(triton_out, torch_out),
                     "config": config_str(autotuned.best_config)})
        print(f"{name:9s} {kernel:24s} {triton_ms:8.3f} ms (torch {torch_ms:8.3f} ms)  {rows[-1]['config']}",
              flush=True)

    delta = D._delta_matmul_kernel
    omega = D.sketch_omega(n, c, seed=0, device="cuda").expand(L, T, n, c)
    x, y = randn(L, T, n, c), randn(L, T, m, c)
    reads = matrices + L * m * n * size
    row("delta_sketch", lambda: D.delta_sketch(finetuned, base, c, 0, input_precision=precision),
        lambda: P.delta_matmul(finetuned, base, omega), reads + L * T * m * c * 4, 2 * L * T * m * n * c, delta)
    omega_t = D.sketch_omega(m, c, seed=0, device="cuda").expand(L, T, m, c)  # the range finder's when m > n
    row("delta_sketch (tau^T)", lambda: D.delta_sketch(finetuned, base, c, 0, transposed=True, input_precision=precision),
        lambda: P.delta_matmul_t(finetuned, base, omega_t), reads + L * T * n * c * 4, 2 * L * T * m * n * c, delta)
    row("delta_matmul", lambda: D.delta_matmul(finetuned, base, x, input_precision=precision),
        lambda: P.delta_matmul(finetuned, base, x), reads + x.nbytes + L * T * m * c * 4, 2 * L * T * m * n * c, delta)
    row("delta_matmul_t", lambda: D.delta_matmul_t(finetuned, base, y, input_precision=precision),
        lambda: P.delta_matmul_t(finetuned, base, y), reads + y.nbytes + L * T * n * c * 4, 2 * L * T * m * n * c,
        delta)
    row("delta_matmul (tau)", lambda: D.delta_matmul(finetuned, None, x, input_precision=precision),
        lambda: P.delta_matmul(finetuned, None, x), matrices + x.nbytes + L * T * m * c * 4, 2 * L * T * m * n * c,
        delta)
    del finetuned, x, y, omega, omega_t
    torch.cuda.empty_cache()

    # Concatenated per-task orthonormal factors, in fp64 as the engine forms their Grams on CUDA
    # (no compute floor: the peak table has no fp64 rate), and in fp32.
    for side, rows_ in (("U", m), ("V", n)):
        panels = torch.linalg.qr(randn(L, T, rows_, k))[0].transpose(1, 2).reshape(L, rows_, K)
        wide = panels.double()
        row(f"gram {side} fp64", lambda: G.gram(wide), lambda: P.gram(wide), wide.nbytes + L * K * K * 8, 0,
            G._gram_kernel)
        row(f"gram {side}", lambda: G.gram(panels, input_precision=precision),
            lambda: P.gram(panels), panels.nbytes + L * K * K * 4, L * rows_ * K * (K + 1), G._gram_kernel)
        del panels, wide

    u, s, v = randn(L, m, K), randn(L, K).abs(), randn(L, n, K)
    row("lowrank_apply", lambda: LA.lowrank_apply(base, u, s, v, 1.0, dtype, input_precision=precision),
        lambda: P.lowrank_apply(base, u, s, v, 1.0, dtype), 2 * L * m * n * size + u.nbytes + v.nbytes,
        2 * L * m * n * K, LA._lowrank_apply_kernel)
    return rows


def markdown(report) -> str:
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    a = report["args"]
    lines = [f"ViT-L-14 shapes, {a['layers']} layers x {a['tasks']} tasks, {a['dtype']} checkpoints, "
             f"{'TF32' if a['tf32'] else 'ieee fp32'} dots; triton {report['triton']}, torch {report['torch']}. "
             f"Peaks: {fmt(report['peak_gbps'], '.0f')} GB/s, {fmt(report['peak_tflops'], '.1f')} TFLOP/s.", "",
             "| shape | kernel | triton ms | torch ms | speedup | memory floor ms | compute floor ms | "
             "floor / triton | rel. err | autotuned config |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['shape']} | {r['kernel']} | {r['triton_ms']:.3f} | {r['torch_ms']:.3f} | "
                     f"{r['speedup']:.2f} | {fmt(r['memory_ms'])} | {fmt(r['compute_ms'])} | "
                     f"{fmt(r['fraction_of_floor'], '.0%')} | {r['rel_err']:.1e} | `{r['config']}` |")
    lines += ["", "Totals over the shape groups:", "",
              "| kernel | triton ms | torch ms | larger floor ms |", "|---|---|---|---|"]
    for kernel in dict.fromkeys(r["kernel"] for r in report["rows"]):
        picked = [r for r in report["rows"] if r["kernel"] == kernel]
        floor = [max(r["memory_ms"] or 0, r["compute_ms"] or 0) for r in picked]
        lines.append(f"| {kernel} | {sum(r['triton_ms'] for r in picked):.3f} | "
                     f"{sum(r['torch_ms'] for r in picked):.3f} | {fmt(sum(floor) or None)} |")
    lines += ["", "Floors: memory = bytes a kernel must move once (inputs read, output written) / peak "
              "bandwidth; compute = useful flops / peak rate for the dot precision (the Gram counts its "
              "upper triangle). floor / triton is the larger floor over the kernel's time."]
    return lines


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_triton.py needs a CUDA GPU: no CUDA device is visible to torch.")
    import triton

    record = Record("bench_triton", "cuda", args.out)
    name = torch.cuda.get_device_name()
    peaks = device_peaks(name, args)
    rows = []
    for shape in args.shapes:
        rows += shape_group(shape, *VIT_L14[shape], args, peaks)
        torch.cuda.empty_cache()
    report = {"device": name, "triton": triton.__version__, "torch": torch.__version__, "args": vars(args),
              "peak_gbps": peaks[0] and peaks[0] / 1e9, "peak_tflops": peaks[1] and peaks[1] / 1e12, "rows": rows}
    record.write(report, f"Triton kernels on {name}", markdown(report))


if __name__ == "__main__":
    main()

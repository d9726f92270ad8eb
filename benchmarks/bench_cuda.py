"""Benchmark the CUDA kernels of tsvmerge.cuda_ops against torch.linalg on one GPU.

Batched symmetric eigh (default 20 tasks x 98 layers = 1960 matrices of 64 x 64 in fp64, the
range finder's small problem as the engine sends it) against torch.linalg.eigh on the same batch
(target: >= 10x on an H100), and Cholesky-QR2 of tall-skinny fp32 panels against
torch.linalg.qr and tsvmerge's torch CholQR2; each time the median of its timed runs after an untimed
one. Writes benchmarks/results/bench_cuda-<device>-<commit>-<time>.{json,md}.

    python benchmarks/bench_cuda.py [--batch 1960] [--n 64] [--eigh-dtype float64] [--m 3072] [--c 64]
"""
from __future__ import annotations

import argparse
import sys

import torch

from recording import RESULTS, Record, median, repeated

EIGH_TARGET_SPEEDUP = 10.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=20 * 98, help="matrices per batch (default 20 x 98)")
    parser.add_argument("--n", type=int, default=64, help="eigh matrix size, <= 128 (default 64)")
    parser.add_argument("--eigh-dtype", choices=["float64", "float32"], default="float64",
                        help="eigh precision (default float64, what the engine sends)")
    parser.add_argument("--m", type=int, default=3072, help="CholQR2 panel height (default 3072)")
    parser.add_argument("--c", type=int, default=64, help="CholQR2 panel width, <= 128 (default 64)")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs of each fast kernel (median)")
    parser.add_argument("--repeat-torch", type=int, default=3, help="timed runs of torch.linalg (median)")
    parser.add_argument("--out", default=RESULTS, help=f"results folder (default {RESULTS})")
    return parser.parse_args(argv)


def median_ms(fn, repeat: int) -> float:
    return median(repeated(fn, repeat, "cuda", warmup=1)).wall_s * 1e3


def bench_eigh(args) -> dict:
    from tsvmerge import cuda_ops

    a = torch.randn(args.batch, args.n, args.n, device="cuda", dtype=getattr(torch, args.eigh_dtype))
    a = a + a.mT
    ours = median_ms(lambda: cuda_ops.batched_eigh(a), args.repeat)
    reference = median_ms(lambda: torch.linalg.eigh(a), args.repeat_torch)
    w, v = cuda_ops.batched_eigh(a)
    exact = torch.linalg.eigvalsh(a[:64].double())
    eye = torch.eye(args.n, device="cuda", dtype=torch.float64)
    return {
        "shape": [args.batch, args.n, args.n],
        "dtype": args.eigh_dtype,
        "cuda_ms": ours,
        "torch_linalg_eigh_ms": reference,
        "speedup": reference / ours,
        "target_speedup": EIGH_TARGET_SPEEDUP,
        "eigenvalue_rel_error": float(((w[:64].double() - exact).abs().amax(-1) / exact.abs().amax(-1)).max()),
        "orthogonality_error": float((v.double().mT @ v.double() - eye).abs().max()),
    }


def bench_cholqr(args) -> dict:
    from tsvmerge import cuda_ops, primitives

    y = torch.randn(args.batch, args.m, args.c, device="cuda")
    ours = median_ms(lambda: cuda_ops.cholesky_qr(y), args.repeat)
    householder = median_ms(lambda: torch.linalg.qr(y), args.repeat_torch)
    torch_cholqr2 = median_ms(lambda: primitives.orthonormalize(y), args.repeat)
    q, route = cuda_ops.cholesky_qr(y)
    eye = torch.eye(args.c, device="cuda", dtype=torch.float64)
    return {
        "shape": [args.batch, args.m, args.c],
        "cuda_ms": ours,
        "torch_linalg_qr_ms": householder,
        "torch_cholqr2_ms": torch_cholqr2,
        "speedup_vs_qr": householder / ours,
        "speedup_vs_torch_cholqr2": torch_cholqr2 / ours,
        "routes": {name: int((route == code).sum()) for code, name in enumerate(cuda_ops.ROUTE_NAMES)},
        "orthogonality_error": float((q.double().mT @ q.double() - eye).abs().max()),
    }


def markdown(result: dict) -> list:
    e, q = result["eigh"], result["cholesky_qr2"]
    return [
        f"Kernels launched by {result['launcher']}.",
        "",
        "| step | shape | cuda (ms) | torch (ms) | speedup | accuracy |",
        "|---|---|---|---|---|---|",
        f"| batched eigh ({e['dtype']}) | {'x'.join(map(str, e['shape']))} | {e['cuda_ms']:.3f} | "
        f"{e['torch_linalg_eigh_ms']:.3f} (linalg.eigh) | {e['speedup']:.1f}x (target {e['target_speedup']:.0f}x) | "
        f"eig rel {e['eigenvalue_rel_error']:.1e}, orth {e['orthogonality_error']:.1e} |",
        f"| CholQR2 | {'x'.join(map(str, q['shape']))} | {q['cuda_ms']:.3f} | {q['torch_linalg_qr_ms']:.3f} "
        f"(linalg.qr), {q['torch_cholqr2_ms']:.3f} (torch CholQR2) | {q['speedup_vs_qr']:.1f}x vs qr, "
        f"{q['speedup_vs_torch_cholqr2']:.1f}x vs torch CholQR2 | orth {q['orthogonality_error']:.1e}, "
        f"routes {q['routes']} |",
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device (torch.cuda.is_available() is False); this benchmark needs a GPU.",
              file=sys.stderr)
        return 1
    from tsvmerge import cuda_ops

    if not cuda_ops.available():
        print("bench_cuda: tsvmerge._C has no CUDA kernels and CuPy is not importable; nothing to run.",
              file=sys.stderr)
        return 1
    record = Record("bench_cuda", "cuda", args.out)
    device = torch.cuda.get_device_name()
    result = {
        "device": device,
        "launcher": "tsvmerge._C" if cuda_ops.compiled_with_cuda() else "CuPy NVRTC",
        "eigh": bench_eigh(args),
        "cholesky_qr2": bench_cholqr(args),
    }
    record.write(result, f"CUDA kernels on {device}", markdown(result))
    print("\n".join(markdown(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

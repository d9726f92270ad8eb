"""Micro-benchmarks of the engine primitives on one ViT-B-32 shape group slice: the torch
references (tsvmerge.primitives) and the torch backend's scheduled and fast routes
(tsvmerge.backends.lapack, .fast_polar).

    pytest benchmarks/bench_primitives.py --benchmark-only

Not part of the default test run (pytest's testpaths is tests/). The slice is what one
batch of the c_fc group looks like for ViT-B-32 x 8 tasks: L = 2 layers, m x n = 3072 x 768,
k = r/T = 96, sketch width c = k + 10, concatenated factors m x Tk = 3072 x 768.
"""
import pytest
import torch

from tsvmerge import primitives as P
from tsvmerge.backends import fast_polar, get_backend, lapack
from tsvmerge.zoo import make_zoo_dicts

L, T = 2, 8
NAME = "visual.transformer.resblocks.{}.mlp.c_fc.weight"
M, N = 3072, 768
K = min(M, N) // T
C = K + 10


@pytest.fixture(scope="module")
def group():
    """(finetuned [L, T, m, n], base [L, m, n], tau [L, T, m, n]) from a powerlaw zoo."""
    base, tasks = make_zoo_dicts("ViT-B-32", T, layers=L)
    b = torch.stack([base[NAME.format(l)] for l in range(L)])
    ft = torch.stack([torch.stack([t[NAME.format(l)] for t in tasks]) for l in range(L)])
    return ft, b, ft - b.unsqueeze(1)


def randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def panels():
    """Concatenated per-task factors [L, m, Tk] with orthonormal task blocks, as TSV-M builds."""
    return torch.linalg.qr(randn(L, T, M, K))[0].permute(0, 2, 1, 3).reshape(L, M, T * K)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-subtract", "tau-given"])
def test_delta_matmul(benchmark, group, fused):
    ft, b, tau = group
    x = randn(L, T, N, C)
    benchmark(P.delta_matmul, ft if fused else tau, b if fused else None, x)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-subtract", "tau-given"])
def test_delta_matmul_t(benchmark, group, fused):
    ft, b, tau = group
    y = randn(L, T, M, C)
    benchmark(P.delta_matmul_t, ft if fused else tau, b if fused else None, y)


def test_orthonormalize(benchmark):
    benchmark(get_backend("torch").orthonormalize, randn(L, T, M, C))


@pytest.mark.parametrize("size", [C, T * K], ids=["sketch-width", "polar-gram"])
def test_sym_eigh(benchmark, size):
    """fp64 as the engine calls it: B B^T of the range finder (L x T of c x c), and the Grams
    of the concatenated factors (L of Tk x Tk, split over threads)."""
    a = randn(L, T, size, size).double() if size == C else randn(L, size, size).double()
    benchmark(lapack.sym_eigh, a @ a.transpose(-1, -2))


@pytest.mark.parametrize("fp64", [False, True], ids=["fp32", "fp64"])
def test_gram(benchmark, panels, fp64):
    benchmark(P.gram, panels.double() if fp64 else panels)


def test_gram_sym(benchmark, panels):
    """The fp64 factor Gram from its block triangle: compare with test_gram[fp64]."""
    benchmark(fast_polar.gram_sym, panels.double())


@pytest.mark.parametrize("route", ["fp32", "fp64"])
def test_polar_root(benchmark, panels, route):
    """(x^T x)^(-1/2) from the factor Gram, as the torch backend orthogonalises: the fp32
    route (a well-conditioned Gram, the tall sides) against the fp64 one (the square sides)."""
    g = fast_polar.gram_sym(panels.double() if route == "fp64" else panels)
    benchmark(fast_polar.polar_root, panels, g)


def test_polar(benchmark, panels):
    benchmark(P.polar, panels)


def test_whiten(benchmark, panels):
    benchmark(P.whiten, panels)


def test_lowrank_apply(benchmark, group, panels):
    _, b, _ = group
    v = torch.linalg.qr(randn(L, N, T * K))[0]
    s = randn(L, T * K).abs()
    benchmark(P.lowrank_apply, b, panels, s, v, 1.0, torch.float32)


@pytest.mark.parametrize("backend,rounds", [("reference", 1), ("torch", 3)])
def test_task_svd(benchmark, group, backend, rounds):
    """The step the torch backend exists for: top-k of L x T task matrices (the exact one takes ~a minute)."""
    _, _, tau = group
    be = get_backend(backend)
    benchmark.pedantic(be.task_svd, args=(tau, None, K), rounds=rounds)

"""CUDA kernels of kernels/cuda: compile checks (nvcc, NVRTC), a CPU emulation of the kernels
(their logic, tested where no GPU is), GPU accuracy against torch.linalg, and tsvmerge._C."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tsvmerge import cuda_ops

KERNEL_DIR = Path(__file__).resolve().parents[1] / "kernels" / "cuda"
HEADERS = sorted(KERNEL_DIR.glob("*.cuh"))
HARNESS = Path(__file__).resolve().parent / "cuda_emulation" / "harness.cpp"
NVCC = os.environ.get("CUDACXX") or shutil.which("nvcc")  # the compiler CMake would pick
GXX = shutil.which("g++")
GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="no CUDA device: GPU accuracy tests skipped")


# -- (a) compile checks -------------------------------------------------------------------------
@pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA compile checks need the CUDA toolkit")
@pytest.mark.parametrize("header", HEADERS, ids=lambda p: p.name)
def test_header_compiles_with_nvcc(header, tmp_path):
    source = tmp_path / "include_it.cu"
    source.write_text(f'#include "{header.name}"\n')
    done = subprocess.run([NVCC, "-arch=sm_90", "-c", str(source), "-o", str(tmp_path / "x.o"), f"-I{KERNEL_DIR}"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_headers_include_only_siblings():
    """NVRTC has no host headers: a kernel header may include only other kernels/cuda headers."""
    for header in HEADERS:
        for line in header.read_text().splitlines():
            include = re.match(r'\s*#\s*include\s*([<"])([^>"]+)', line)
            if include:
                assert include.group(1) == '"' and (KERNEL_DIR / include.group(2)).exists(), f"{header.name}: {line}"


def test_headers_compile_with_nvrtc():
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as err:  # CuPy absent, or its NVRTC library not installed
        pytest.skip(f"NVRTC not available here ({type(err).__name__}: {str(err).splitlines()[0]})")
    assert sorted(cuda_ops.NVRTC_HEADERS) == [h.name for h in HEADERS]
    program = nvrtc.createProgram(cuda_ops.nvrtc_source(), "tsvmerge_kernels.cu", [], [])
    try:
        nvrtc.compileProgram(program, [*cuda_ops.nvrtc_options(), "--gpu-architecture=compute_90"])
    except nvrtc.NVRTCError as err:
        pytest.fail(f"NVRTC: {err}\n{nvrtc.getProgramLog(program)}")
    finally:
        nvrtc.destroyProgram(program)


# -- (b) the kernels on the CPU: tests/cuda_emulation/harness.cpp ---------------------------------
@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ not found: the CPU emulation of the kernels needs a C++20 compiler")
    library = tmp_path_factory.mktemp("emu") / "emu.so"
    subprocess.run([GXX, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", f"-I{KERNEL_DIR}", str(HARNESS),
                    "-o", str(library)], check=True, capture_output=True)
    return ctypes.CDLL(str(library))


def _ptr(x: np.ndarray):
    return x.ctypes.data_as(ctypes.c_void_p)


def emu_eigh(emu, a: np.ndarray, threads: int | None = None):
    batch, n, _ = a.shape
    default_threads, smem = cuda_ops.eigh_launch(n)
    w, v = np.full((batch, n), np.nan, np.float32), np.full((batch, n, n), np.nan, np.float32)
    overran = emu.emu_jacobi_eigh(_ptr(a), _ptr(w), _ptr(v), batch, n, threads or default_threads,
                                  ctypes.c_size_t(smem))
    assert overran == 0, "kernel used more shared memory than eigh_launch gives it"
    return w, v


def emu_cholqr_pass(emu, y: np.ndarray, allow_shift: bool):
    batch, m, c = y.shape
    y64 = y.astype(np.float64)
    gram = np.ascontiguousarray(y64.transpose(0, 2, 1) @ y64, dtype=np.float32)  # as cuda_ops forms it
    low, status = np.full((batch, c, c), np.nan, np.float32), np.full(batch, -1, np.int32)
    threads, smem = cuda_ops.cholesky_launch(c)
    assert emu.emu_cholesky(_ptr(gram), _ptr(low), _ptr(status), batch, c, int(allow_shift), threads,
                            ctypes.c_size_t(smem)) == 0
    q = np.full_like(y, np.nan)
    rows, smem = cuda_ops.trsm_launch(c)
    assert emu.emu_trsm(_ptr(y), _ptr(low), _ptr(q), batch, m, c, rows, ctypes.c_size_t(smem)) == 0
    return q, status


def emu_cholesky_qr2(emu, y):
    """cuda_ops.cholesky_qr2's sequence of passes (without its Householder fallback)."""
    q, route = emu_cholqr_pass(emu, y, True)
    q, status = emu_cholqr_pass(emu, q, False)
    route = np.maximum(route, status)
    shifted = np.flatnonzero(route == cuda_ops.ROUTE_SHIFTED_CHOLQR3)
    if shifted.size:
        q[shifted], status = emu_cholqr_pass(emu, np.ascontiguousarray(q[shifted]), False)
        route[shifted] = np.maximum(route[shifted], status)
    return q, route


def symmetric_from_lower(a: np.ndarray) -> np.ndarray:
    return np.tril(a) + np.tril(a, -1).transpose(0, 2, 1)


def eigh_errors(a, w, v):
    """(eigenvalue error, orthogonality error, reconstruction error), relative to max |lambda|."""
    a = symmetric_from_lower(np.asarray(a, np.float64))
    w, v = np.asarray(w, np.float64), np.asarray(v, np.float64)
    exact = np.linalg.eigvalsh(a)
    scale = max(np.abs(exact).max(), np.finfo(np.float64).tiny)
    ortho = np.abs(v.transpose(0, 2, 1) @ v - np.eye(a.shape[-1])).max()
    recon = np.abs((v * w[:, None, :]) @ v.transpose(0, 2, 1) - a).max() / scale
    return np.abs(w - exact).max() / scale, ortho, recon


def panel(rng, m, c, cond):
    """m x c with singular values log-spaced from 1 to 1/cond."""
    u = np.linalg.qr(rng.standard_normal((m, c)))[0]
    v = np.linalg.qr(rng.standard_normal((c, c)))[0]
    return ((u * np.logspace(0, -np.log10(cond), c)) @ v.T).astype(np.float32)


# The emulation runs one OS thread per CUDA thread; 32 keeps the large sizes quick (the kernels
# take any block size; the GPU tests run the launch geometry of eigh_launch).
@pytest.mark.parametrize("n, threads", [(1, None), (7, None), (33, None), (64, 32), (100, 32), (128, 32)])
def test_emulated_eigh_random(emu, n, threads):
    a = np.random.default_rng(n).standard_normal((2, n, n)).astype(np.float32)
    w, v = emu_eigh(emu, a, threads)
    assert np.all(np.diff(w, axis=-1) >= 0)
    assert max(eigh_errors(a, w, v)) < 1e-5


def test_emulated_eigh_structured(emu):
    rng = np.random.default_rng(1)
    n = 40
    graded = rng.standard_normal((n, 500)) * np.logspace(0, -6, n)[:, None]   # B B^T, as in the range finder
    q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    cases = {
        "graded psd": graded @ graded.T,
        "repeated eigenvalues": (q * np.repeat([1.0, 2.0, 3.0, 4.0], n // 4)) @ q.T,
        "diagonal": np.diag(rng.standard_normal(n)),
        "zero": np.zeros((n, n)),
        "scale 1e-30": rng.standard_normal((n, n)) * 1e-30,
        "scale 1e30": rng.standard_normal((n, n)) * 1e30,
    }
    for name, a in cases.items():
        a = a.astype(np.float32)[None]
        assert max(eigh_errors(a, *emu_eigh(emu, a, 32))) < 1e-5, name


def test_emulated_eigh_nan_input_gives_nan(emu):
    a = np.random.default_rng(2).standard_normal((1, 8, 8)).astype(np.float32)
    a[0, 5, 2] = np.nan
    w, v = emu_eigh(emu, a)
    assert np.isnan(w).all() and np.isnan(v).all()


@pytest.mark.parametrize("m, c, cond, route", [
    (300, 1, 1.0, cuda_ops.ROUTE_CHOLQR2),
    (500, 64, 1e3, cuda_ops.ROUTE_CHOLQR2),
    (200, 128, 10.0, cuda_ops.ROUTE_CHOLQR2),
    (1000, 64, 1e5, cuda_ops.ROUTE_SHIFTED_CHOLQR3),
    (129, 128, 1e4, cuda_ops.ROUTE_SHIFTED_CHOLQR3),
])
def test_emulated_cholesky_qr2(emu, m, c, cond, route):
    rng = np.random.default_rng(c)
    y = np.stack([panel(rng, m, c, cond) for _ in range(2)])
    q, routes = emu_cholesky_qr2(emu, y)
    assert np.all(routes == route)
    q = q.astype(np.float64)
    assert np.abs(q.transpose(0, 2, 1) @ q - np.eye(c)).max() < 1e-5
    assert np.abs(q @ (q.transpose(0, 2, 1) @ y) - y).max() < 1e-5 * np.abs(y).max()


def test_emulated_cholesky_rank_deficient_fails_to_identity(emu):
    y = panel(np.random.default_rng(3), 100, 8, 10.0)[None].copy()
    y[0, :, 3] = 0.0
    q, status = emu_cholqr_pass(emu, y, allow_shift=True)
    q2, status2 = emu_cholqr_pass(emu, q, allow_shift=False)
    assert status[0] == cuda_ops.ROUTE_SHIFTED_CHOLQR3 and status2[0] == cuda_ops.ROUTE_HOUSEHOLDER
    assert np.array_equal(q2, q)  # L = I: the solve passes y through, finite


def test_emulated_trsm_matches_solve(emu):
    rng = np.random.default_rng(4)
    y = rng.standard_normal((3, 300, 20)).astype(np.float32)   # 3 row blocks, the last one partial
    q, status = emu_cholqr_pass(emu, y, allow_shift=False)
    assert np.all(status == cuda_ops.ROUTE_CHOLQR2)
    r = np.linalg.cholesky(y.transpose(0, 2, 1).astype(np.float64) @ y).transpose(0, 2, 1)
    assert np.abs(q @ r - y).max() < 1e-5 * np.abs(y).max()


# -- (b) on a GPU, through each available launcher ------------------------------------------------
def _launchers():
    found = []
    if cuda_ops.compiled_with_cuda():
        from tsvmerge import _C

        found.append(pytest.param(_C, id="compiled"))
    if cuda_ops.cupy_importable():
        found.append(pytest.param("nvrtc", id="nvrtc"))
    return found or [pytest.param(None, id="none", marks=pytest.mark.skip(reason="neither _C with CUDA nor CuPy"))]


@pytest.fixture(scope="module", params=_launchers())
def ops(request):
    if not GPU:
        pytest.skip("no CUDA device: GPU accuracy tests skipped")
    return cuda_ops._NvrtcOps() if request.param == "nvrtc" else request.param


def _stream():
    return torch.cuda.current_stream().cuda_stream


@needs_gpu
@pytest.mark.parametrize("batch", [1, 1960])
@pytest.mark.parametrize("n", [1, 7, 33, 64, 100, 128])
def test_gpu_eigh(ops, n, batch):
    gen = torch.Generator(device="cuda").manual_seed(n * batch)
    a = torch.randn(batch, n, n, device="cuda", generator=gen)
    a = a + a.mT
    w = torch.full((batch, n), float("nan"), device="cuda")
    v = torch.full((batch, n, n), float("nan"), device="cuda")
    ops.jacobi_eigh(a.data_ptr(), w.data_ptr(), v.data_ptr(), batch, n, _stream())
    vd, wd, ad = v.double(), w.double(), a.double()
    scale = ad.abs().sum(-1).amax()  # >= max |lambda|
    assert bool((w.diff(dim=-1) >= 0).all())
    assert (vd.mT @ vd - torch.eye(n, device="cuda", dtype=torch.float64)).abs().max() < 1e-5
    assert ((vd * wd.unsqueeze(-2)) @ vd.mT - ad).abs().max() < 1e-5 * scale
    some = slice(0, 16)  # the exact fp64 reference for a few matrices keeps the test quick
    exact = torch.linalg.eigvalsh(ad[some])
    assert ((wd[some] - exact).abs().amax(-1) <= 1e-5 * exact.abs().amax(-1)).all()


@needs_gpu
def test_gpu_batched_eigh_wrapper_matches_torch():
    a = torch.randn(3, 5, 64, 64, device="cuda")
    w, v = cuda_ops.batched_eigh(a)  # lower triangle read, as torch.linalg.eigh
    exact = torch.linalg.eigvalsh(a.double())
    assert w.shape == (3, 5, 64) and v.shape == a.shape
    assert ((w.double() - exact).abs().amax(-1) <= 1e-5 * exact.abs().amax(-1)).all()


def _gpu_panels(m, c, cond, batch, seed):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([panel(rng, m, c, cond) for _ in range(batch)])).cuda()


@needs_gpu
def test_gpu_cholesky_and_trsm_poisoned(ops):
    y = _gpu_panels(1000, 64, 100.0, 4, 0)
    gram = (y.double().mT @ y.double()).float()
    low = torch.full_like(gram, float("nan"))
    status = torch.full((4,), -1, device="cuda", dtype=torch.int32)
    q = torch.full_like(y, float("nan"))
    ops.cholesky(gram.data_ptr(), low.data_ptr(), status.data_ptr(), 4, 64, True, _stream())
    ops.trsm_lower_t(y.data_ptr(), low.data_ptr(), q.data_ptr(), 4, 1000, 64, _stream())
    assert (status == cuda_ops.ROUTE_CHOLQR2).all()
    assert torch.equal(low.triu(1), torch.zeros_like(low))
    assert ((q @ low.mT - y).abs().max() < 1e-4 * y.abs().max())


@needs_gpu
@pytest.mark.parametrize("cond, route", [(10.0, cuda_ops.ROUTE_CHOLQR2), (1e5, cuda_ops.ROUTE_SHIFTED_CHOLQR3)])
def test_gpu_cholesky_qr2(cond, route):
    y = _gpu_panels(3072, 64, cond, 8, 1)
    q, routes = cuda_ops.cholesky_qr2(y)
    assert (routes == route).all()
    qd = q.double()
    assert (qd.mT @ qd - torch.eye(64, device="cuda", dtype=torch.float64)).abs().max() < 1e-5
    assert (qd @ (qd.mT @ y.double()) - y).abs().max() < 1e-5 * y.abs().max()


@needs_gpu
def test_gpu_cholesky_qr2_rank_deficient_uses_householder():
    y = _gpu_panels(500, 16, 10.0, 3, 2)
    y[1, :, 4] = 0.0
    q, routes = cuda_ops.cholesky_qr2(y)
    assert routes.tolist() == [cuda_ops.ROUTE_CHOLQR2, cuda_ops.ROUTE_HOUSEHOLDER, cuda_ops.ROUTE_CHOLQR2]
    assert (q.mT @ q - torch.eye(16, device="cuda")).abs().max() < 1e-5


@needs_gpu
def test_gpu_cuda_backend_overrides():
    from tsvmerge.backends import get_backend

    backend = get_backend("cuda", device="cuda")
    q = backend.orthonormalize(torch.randn(2, 3, 500, 40, device="cuda"))
    w, _ = backend.sym_eigh(torch.eye(40, device="cuda").expand(6, 40, 40))
    assert torch.allclose(q.mT @ q, torch.eye(40, device="cuda"), atol=1e-5)
    assert torch.allclose(w, torch.ones_like(w)) and backend.describe()["qr_routes"] == {"cholqr2": 6}


# -- (c) the compiled module and the argument checks ------------------------------------------------
def test_build_info_matches_module():
    from tsvmerge import _C

    info = _C.build_info()
    has_kernels = all(hasattr(_C, f) for f in ("jacobi_eigh", "cholesky", "trsm_lower_t"))
    assert info["cuda"] is has_kernels
    assert cuda_ops.compiled_with_cuda() is info["cuda"]


@pytest.mark.skipif(not cuda_ops.compiled_with_cuda(), reason="tsvmerge._C built without CUDA (host-only)")
def test_compiled_size_checks_need_no_gpu():
    from tsvmerge import _C

    with pytest.raises(ValueError, match=r"jacobi_eigh: n must be in \[1, 128\], got 129"):
        _C.jacobi_eigh(256, 256, 256, 1, 129)
    with pytest.raises(ValueError, match=r"cholesky: c must be in \[1, 128\], got 0"):
        _C.cholesky(256, 256, 256, 1, 0, True)
    with pytest.raises(ValueError, match=r"trsm_lower_t: batch must be in \[0, 2\^31\)"):
        _C.trsm_lower_t(256, 256, 256, -1, 10, 4)


def test_wrappers_reject_bad_inputs():
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        cuda_ops.batched_eigh(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        cuda_ops.cholesky_qr2(torch.zeros(10, 4))


def test_cuda_backend_falls_back_off_gpu():
    from tsvmerge.backends.cuda import CudaBackend

    backend = CudaBackend(device="cpu")
    a = torch.randn(3, 6, 6)
    w, _ = backend.sym_eigh(a)
    assert torch.allclose(w, torch.linalg.eigvalsh(a), atol=1e-5)  # eigh and eigvalsh take different LAPACK paths
    q = backend.orthonormalize(torch.randn(2, 30, 5))
    assert torch.allclose(q.mT @ q, torch.eye(5), atol=1e-5)
    assert CudaBackend.is_available() is (GPU and (cuda_ops.compiled_with_cuda() or cuda_ops.cupy_importable()))

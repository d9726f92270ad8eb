"""CUDA kernels of kernels/cuda against their references in tsvmerge.primitives: compile checks
(nvcc, NVRTC); on CPU, an emulation of the kernels driven by cuda_ops' own host code with the
launch geometry of csrc/launch_geometry.h (what the GPU gets); on a GPU, each launcher; and
the cuda backend's fallbacks."""
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
from tsvmerge import primitives as P

KERNEL_DIR = cuda_ops.kernel_dir()  # what the package compiles, in a checkout and a wheel alike
HEADERS = sorted(KERNEL_DIR.glob("*.cuh"))
CSRC = Path(__file__).resolve().parents[1] / "csrc"
HARNESS = Path(__file__).resolve().parent / "cuda_emulation" / "harness.cpp"
NVCC = os.environ.get("CUDACXX") or shutil.which("nvcc")  # the compiler CMake would pick
GXX = shutil.which("g++")
GPU = torch.cuda.is_available()
H100_SMEM = 232448  # shared memory per block (opt-in) on H100/H200
needs_gpu = pytest.mark.skipif(not GPU, reason="no CUDA device: GPU accuracy tests skipped")
EIGH_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


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
    assert {"common.cuh", "jacobi_eigh.cuh", "cholesky_qr.cuh"} <= {h.name for h in HEADERS}, KERNEL_DIR
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
    subprocess.run([GXX, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", f"-I{KERNEL_DIR}", f"-I{CSRC}",
                    str(HARNESS), "-o", str(library)], check=True, capture_output=True)
    return ctypes.CDLL(str(library))


class EmulatedOps:
    """The launcher interface of tsvmerge._C (and of the NVRTC one), on CPU pointers: cuda_ops'
    host code (run_eigh, run_cholesky_qr) drives the emulated kernels with the GPU's geometry
    for a device with `max_smem` bytes. Outputs and scratch are poisoned (0xFF bytes: NaN)
    before each launch. `threads` overrides eigh's block size (one OS thread per CUDA thread)."""

    def __init__(self, emu, max_smem=H100_SMEM, threads=0):
        self.emu, self.max_smem, self.threads = emu, max_smem, threads

    def jacobi_eigh(self, a, w, v, v_scratch, batch, n, fp64, stream):
        size = 8 if fp64 else 4
        ctypes.memset(w, 0xFF, batch * n * size)
        ctypes.memset(v, 0xFF, batch * n * n * size)
        scratch = cuda_ops.native().eigh_launch(n, size, self.max_smem)[2]
        if scratch:
            ctypes.memset(v_scratch, 0xFF, batch * scratch * size)
        overran = self.emu.emu_jacobi_eigh(*map(ctypes.c_void_p, (a, w, v, v_scratch)), batch, n, int(fp64),
                                           ctypes.c_size_t(self.max_smem), self.threads)
        assert overran == 0, "the kernel used more shared memory than launch_geometry.h gives it"

    def cholesky(self, g, l, status, batch, c, allow_shift, stream):
        ctypes.memset(l, 0xFF, batch * c * c * 4)
        ctypes.memset(status, 0xFF, batch * 4)
        assert self.emu.emu_cholesky(*map(ctypes.c_void_p, (g, l, status)), batch, c, int(allow_shift)) == 0

    def trsm_lower_t(self, y, l, q, batch, m, c, stream):
        if q != y:
            ctypes.memset(q, 0xFF, batch * m * c * 4)
        assert self.emu.emu_trsm(*map(ctypes.c_void_p, (y, l, q)), batch, m, c) == 0


def emu_eigh(emu, a: torch.Tensor, threads=0, max_smem=H100_SMEM):
    return cuda_ops.run_eigh(a, EmulatedOps(emu, max_smem, threads), max_smem, 0)


def emu_cholesky_qr(emu, y: torch.Tensor, passes=2):
    return cuda_ops.run_cholesky_qr(y, passes, EmulatedOps(emu), 0)


def test_emulation_uses_the_geometry_tsvmerge_C_exposes(emu):
    """The harness and tsvmerge._C (the NVRTC launcher's numbers) compile the same geometry."""
    out = (ctypes.c_int64 * 3)()
    for n, size, smem in [(1, 4, H100_SMEM), (33, 8, H100_SMEM), (128, 4, H100_SMEM), (128, 8, H100_SMEM),
                          (64, 8, 48 * 1024), (64, 8, 32 * 1024)]:
        emu.emu_eigh_launch(n, size, ctypes.c_size_t(smem), out)
        assert tuple(out) == cuda_ops.native().eigh_launch(n, size, smem)


def test_fp64_eigh_keeps_v_in_shared_memory_while_it_fits():
    """The geometry puts V^T in global scratch only where shared memory cannot hold it:
    fp32 up to 128, fp64 up to 118 on H100/H200."""
    launch = cuda_ops.native().eigh_launch
    assert launch(128, 4, H100_SMEM)[2] == 0 and launch(118, 8, H100_SMEM)[2] == 0
    assert launch(120, 8, H100_SMEM)[2] == 120 * 121 and launch(128, 8, H100_SMEM)[1] <= H100_SMEM


def symmetric_from_lower(a: torch.Tensor) -> torch.Tensor:
    return a.tril() + a.tril(-1).mT


def eigh_errors(a, w, v):
    """(eigenvalue error against primitives.sym_eigh, orthogonality error, reconstruction error),
    relative to max |lambda|."""
    a = symmetric_from_lower(a.double())
    w, v = w.double(), v.double()
    exact = P.sym_eigh(a)[0]
    scale = max(exact.abs().max().item(), torch.finfo(torch.float64).tiny)
    ortho = (v.mT @ v - torch.eye(a.shape[-1], dtype=torch.float64)).abs().max().item()
    recon = ((v * w.unsqueeze(-2)) @ v.mT - a).abs().max().item() / scale
    return (w - exact).abs().max().item() / scale, ortho, recon


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]


# The emulation runs one OS thread per CUDA thread: up to n = 33 with the GPU's block size
# (256 threads from n = 23), larger sizes with 32 threads (the kernels take any block size).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, threads", [(1, 0), (7, 0), (33, 0), (64, 32), (100, 32), (128, 32)])
def test_emulated_eigh_random(emu, n, threads, dtype, seed):
    """Batch 2 of random symmetric matrices (fp64 at n = 128: V^T in global scratch)."""
    a = torch.randn(2, n, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    w, v = emu_eigh(emu, a, threads)
    assert bool((w.diff(dim=-1) >= 0).all())
    assert max(eigh_errors(a, w, v)) < EIGH_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_eigh_with_v_in_global_memory(emu, dtype, seed):
    """A device one byte short of holding V^T in shared memory: it goes to the caller's global
    scratch (fp64 past n = 118 on H100/H200)."""
    a = torch.randn(3, 41, 41, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    smem = cuda_ops.native().eigh_launch(41, a.element_size(), 1 << 30)[1] - 1
    threads, used, scratch = cuda_ops.native().eigh_launch(41, a.element_size(), smem)
    assert scratch == 42 * 43 and used <= smem
    w, v = emu_eigh(emu, a, max_smem=smem)
    assert max(eigh_errors(a, w, v)) < EIGH_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_eigh_structured(emu, dtype):
    gen = torch.Generator().manual_seed(1)
    n = 40
    graded = torch.randn(n, 500, generator=gen, dtype=torch.float64) * torch.logspace(0, -6, n, dtype=torch.float64)[:, None]
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    cases = {
        "graded psd": graded @ graded.T,   # B B^T, as in the range finder
        "repeated eigenvalues": (q * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).repeat_interleave(n // 4)) @ q.T,
        "diagonal": torch.diag(torch.randn(n, generator=gen, dtype=torch.float64)),
        "zero": torch.zeros(n, n, dtype=torch.float64),
        "scale 1e-30": torch.randn(n, n, generator=gen, dtype=torch.float64) * 1e-30,
        "scale 1e30": torch.randn(n, n, generator=gen, dtype=torch.float64) * 1e30,
    }
    for name, a in cases.items():
        a = a.to(dtype)[None]
        assert max(eigh_errors(a, *emu_eigh(emu, a, 32))) < EIGH_TOL[dtype], name


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_eigh_nan_input_gives_nan(emu, dtype):
    a = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=dtype)
    a[0, 5, 2] = float("nan")
    w, v = emu_eigh(emu, a)
    assert w.isnan().all() and v.isnan().all()


def panel(gen, m, c, cond):
    """m x c with singular values log-spaced from 1 to 1/cond."""
    u = torch.linalg.qr(torch.randn(m, c, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(c, c, generator=gen, dtype=torch.float64))[0]
    return ((u * torch.logspace(0, -np.log10(cond), c, dtype=torch.float64)) @ v.T).float()


@pytest.mark.parametrize("m, c, cond, route", [
    (300, 1, 1.0, cuda_ops.ROUTE_CHOLESKY),
    (500, 64, 1e3, cuda_ops.ROUTE_CHOLESKY),
    (200, 128, 10.0, cuda_ops.ROUTE_CHOLESKY),
    (1000, 64, 1e5, cuda_ops.ROUTE_SHIFTED),
    (129, 128, 1e4, cuda_ops.ROUTE_SHIFTED),
])
def test_emulated_cholesky_qr(emu, m, c, cond, route, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.stack([panel(gen, m, c, cond) for _ in range(2)])
    q, routes = emu_cholesky_qr(emu, y)
    assert bool((routes == route).all())
    q = q.double()
    assert (q.mT @ q - torch.eye(c, dtype=torch.float64)).abs().max() < 1e-5
    assert (q @ (q.mT @ y.double()) - y).abs().max() < 1e-5 * y.abs().max()
    if route == cuda_ops.ROUTE_CHOLESKY:  # Q of full-rank y is unique: the reference's, to rounding
        assert (q - P.orthonormalize(y.double())).abs().max() < 1e-5 * cond


def test_emulated_cholesky_qr_one_pass(emu, seed):
    """passes=1 is one Cholesky-QR pass, as primitives.orthonormalize(y, 1): a basis
    orthonormal to about eps cond(y)^2, enough for the range finder's intermediate bases."""
    y = panel(torch.Generator().manual_seed(seed), 400, 30, 100.0)[None]
    q, routes = emu_cholesky_qr(emu, y, passes=1)
    want = P.orthonormalize(y, passes=1)
    assert bool((routes == cuda_ops.ROUTE_CHOLESKY).all())
    assert (q - want).abs().max() < 1e-3
    assert (q.mT @ q - torch.eye(30)).abs().max() > 1e-6  # one pass indeed: not yet orthonormal to rounding


def test_emulated_cholesky_qr_rank_deficient_uses_householder(emu, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.stack([panel(gen, 100, 8, 10.0) for _ in range(3)])
    y[1, :, 3] = 0.0
    q, routes = emu_cholesky_qr(emu, y)
    assert routes.tolist() == [cuda_ops.ROUTE_CHOLESKY, cuda_ops.ROUTE_HOUSEHOLDER, cuda_ops.ROUTE_CHOLESKY]
    assert (q.mT @ q - torch.eye(8)).abs().max() < 1e-5


def test_emulated_cholesky_failure_writes_identity(emu):
    """A failed factorisation writes L = I, so the solve passes y through, finite."""
    y = panel(torch.Generator().manual_seed(3), 100, 8, 10.0)[None]
    y[0, :, 3] = 0.0
    gram = (y.double().mT @ y.double()).float()
    low, status = torch.empty_like(gram), torch.empty(1, dtype=torch.int32)
    q = torch.empty_like(y)
    ops = EmulatedOps(emu)
    ops.cholesky(gram.data_ptr(), low.data_ptr(), status.data_ptr(), 1, 8, False, 0)
    ops.trsm_lower_t(y.data_ptr(), low.data_ptr(), q.data_ptr(), 1, 100, 8, 0)
    assert status.item() == cuda_ops.ROUTE_HOUSEHOLDER and torch.equal(low[0], torch.eye(8))
    assert torch.equal(q, y)


def test_emulated_trsm_matches_solve(emu, seed):
    y = torch.randn(3, 300, 20, generator=torch.Generator().manual_seed(seed))   # 3 row blocks, the last partial
    gram = (y.double().mT @ y.double()).float()
    low, status, q = torch.empty_like(gram), torch.empty(3, dtype=torch.int32), torch.empty_like(y)
    ops = EmulatedOps(emu)
    ops.cholesky(gram.data_ptr(), low.data_ptr(), status.data_ptr(), 3, 20, False, 0)
    ops.trsm_lower_t(y.data_ptr(), low.data_ptr(), q.data_ptr(), 3, 300, 20, 0)
    assert bool((status == cuda_ops.ROUTE_CHOLESKY).all())
    r = torch.linalg.cholesky(y.double().mT @ y.double()).mT
    assert (q.double() @ r - y).abs().max() < 1e-5 * y.abs().max()


# -- (c) on a GPU, through each available launcher ------------------------------------------------
def _launchers():
    found = []
    if cuda_ops.compiled_with_cuda():
        found.append(pytest.param("compiled", id="compiled"))
    if cuda_ops.cupy_importable():
        found.append(pytest.param("nvrtc", id="nvrtc"))
    return found or [pytest.param(None, id="none", marks=pytest.mark.skip(reason="neither _C with CUDA nor CuPy"))]


@pytest.fixture(scope="module", params=_launchers())
def ops(request):
    if not GPU:
        pytest.skip("no CUDA device: GPU accuracy tests skipped")
    return cuda_ops._NvrtcOps() if request.param == "nvrtc" else cuda_ops.native()


def _stream():
    return torch.cuda.current_stream().cuda_stream


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 1960])
@pytest.mark.parametrize("n", [1, 7, 33, 64, 100, 118, 128])
def test_gpu_eigh(ops, n, batch, dtype):
    gen = torch.Generator(device="cuda").manual_seed(n * batch)
    a = torch.randn(batch, n, n, device="cuda", generator=gen, dtype=dtype)
    a = a + a.mT
    with torch.cuda.device(a.device):
        w, v = cuda_ops.run_eigh(a, ops, cuda_ops.max_smem(a.device), _stream())
    vd, wd, ad = v.double(), w.double(), a.double()
    tol = EIGH_TOL[dtype]
    scale = ad.abs().sum(-1).amax()  # >= max |lambda|
    assert bool((w.diff(dim=-1) >= 0).all())
    assert (vd.mT @ vd - torch.eye(n, device="cuda", dtype=torch.float64)).abs().max() < tol
    assert ((vd * wd.unsqueeze(-2)) @ vd.mT - ad).abs().max() < tol * scale
    some = slice(0, 16)  # the fp64 reference for a few matrices keeps the test quick
    exact = P.sym_eigh(ad[some])[0]
    assert ((wd[some] - exact).abs().amax(-1) <= tol * exact.abs().amax(-1)).all()


@needs_gpu
def test_gpu_batched_eigh_wrapper_matches_the_reference():
    a = torch.randn(3, 5, 64, 64, device="cuda", dtype=torch.float64)
    w, v = cuda_ops.batched_eigh(a)  # lower triangle read, as torch.linalg.eigh
    exact = P.sym_eigh(a)[0]
    assert w.shape == (3, 5, 64) and v.shape == a.shape
    assert ((w - exact).abs().amax(-1) <= 1e-12 * exact.abs().amax(-1)).all()


def _gpu_panels(m, c, cond, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([panel(gen, m, c, cond) for _ in range(batch)]).cuda()


@needs_gpu
@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("cond, route", [(10.0, cuda_ops.ROUTE_CHOLESKY), (1e5, cuda_ops.ROUTE_SHIFTED)])
def test_gpu_cholesky_qr(ops, cond, route, passes):
    y = _gpu_panels(3072, 64, cond, 8, 1)
    with torch.cuda.device(y.device):
        q, routes = cuda_ops.run_cholesky_qr(y, passes, ops, _stream())
    assert (routes == route).all()
    qd = q.double()
    if passes == 2:
        assert (qd.mT @ qd - torch.eye(64, device="cuda", dtype=torch.float64)).abs().max() < 1e-5
    assert (qd @ torch.linalg.lstsq(qd, y.double()).solution - y).abs().max() < 1e-5 * y.abs().max()
    if route == cuda_ops.ROUTE_CHOLESKY:
        assert (q - P.orthonormalize(y, passes)).abs().max() < 1e-4


@needs_gpu
def test_gpu_cholesky_qr_rank_deficient_uses_householder():
    y = _gpu_panels(500, 16, 10.0, 3, 2)
    y[1, :, 4] = 0.0
    q, routes = cuda_ops.cholesky_qr(y)
    assert routes.tolist() == [cuda_ops.ROUTE_CHOLESKY, cuda_ops.ROUTE_HOUSEHOLDER, cuda_ops.ROUTE_CHOLESKY]
    assert (q.mT @ q - torch.eye(16, device="cuda")).abs().max() < 1e-5


@needs_gpu
def test_gpu_cuda_backend_runs_its_kernels():
    from tsvmerge.backends import get_backend

    backend = get_backend("cuda", device="cuda")
    q = backend.orthonormalize(torch.randn(2, 3, 500, 40, device="cuda"))
    w, _ = backend.sym_eigh(torch.eye(40, device="cuda", dtype=torch.float64).expand(6, 40, 40))
    assert torch.allclose(q.mT @ q, torch.eye(40, device="cuda"), atol=1e-5)
    assert torch.allclose(w, torch.ones_like(w))
    assert backend.describe()["qr_routes"] == {"cholesky_qr": 6} and backend.describe()["fallbacks"] == {}


# -- (d) the compiled module, the argument checks and the fallbacks ----------------------------------
def test_build_info_matches_module():
    """The CUDA entry points exist exactly when build_info says so; the geometry always does."""
    from tsvmerge import _C

    has_kernels = all(hasattr(_C, f) for f in ("jacobi_eigh", "cholesky", "trsm_lower_t"))
    assert _C.build_info()["cuda"] is has_kernels
    assert _C.EIGH_MAX_N == _C.CHOLQR_MAX_C == 128 and _C.trsm_launch(64)[0] > 0


@pytest.mark.skipif(not cuda_ops.compiled_with_cuda(), reason="tsvmerge._C built without CUDA (host-only)")
def test_compiled_size_checks_need_no_gpu():
    from tsvmerge import _C

    with pytest.raises(ValueError, match=r"jacobi_eigh: n must be in \[1, 128\], got 129"):
        _C.jacobi_eigh(256, 256, 256, 0, 1, 129, True)
    with pytest.raises(ValueError, match=r"cholesky: c must be in \[1, 128\], got 0"):
        _C.cholesky(256, 256, 256, 1, 0, True)
    with pytest.raises(ValueError, match=r"trsm_lower_t: batch must be in \[0, 2\^31\)"):
        _C.trsm_lower_t(256, 256, 256, -1, 10, 4)


def test_wrappers_reject_bad_inputs():
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        cuda_ops.batched_eigh(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        cuda_ops.cholesky_qr(torch.zeros(10, 4))


def test_cuda_backend_records_declined_inputs():
    """Off the GPU every input is declined: torch's results, and each decline counted with its
    reason in describe() (the merge report's backend section)."""
    from tsvmerge.backends.cuda import CudaBackend

    backend = CudaBackend(device="cpu")
    a = torch.randn(3, 6, 6, dtype=torch.float64)
    w, _ = backend.sym_eigh(a)
    assert torch.allclose(w, P.sym_eigh(a)[0])
    q = backend.orthonormalize(torch.randn(2, 30, 5))
    assert torch.allclose(q.mT @ q, torch.eye(5), atol=1e-5)
    assert backend.describe()["fallbacks"] == {"orthonormalize": {"device cpu": 1}, "sym_eigh": {"device cpu": 1}}

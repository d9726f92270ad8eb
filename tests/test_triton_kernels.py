"""Triton kernels against their torch references in tsvmerge.primitives (Liger-Kernel style).

Without a CUDA device the kernels run in Triton's interpreter on CPU tensors. Every kernel
loads bf16/fp16 tiles and upcasts them in registers, so all dots are fp32 (fp64 for fp64 Grams) and the
interpreter (numpy, no bf16 arithmetic) needs no fp32 fallback in the test path.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import
pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

import triton  # noqa: E402

import tsvmerge  # noqa: E402
import tsvmerge.backends  # noqa: E402
from conftest import random_zoo  # noqa: E402
from tsvmerge import primitives as P  # noqa: E402
from tsvmerge.backends.torch_backend import TorchBackend  # noqa: E402
from tsvmerge.backends.triton import TritonBackend  # noqa: E402
from tsvmerge.kernels.triton import delta_sketch as D  # noqa: E402
from tsvmerge.kernels.triton import gram as G  # noqa: E402
from tsvmerge.kernels.triton import lowrank_apply as LA  # noqa: E402
from tsvmerge.report import format_merge_report  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in (torch.float32, torch.bfloat16, torch.float16)]
BATCHES = [pytest.param(1, 1, id="L1T1"), pytest.param(2, 3, id="L2T3")]
# Kernel math is fp32 (ieee dots), so fp32 results agree to rounding whatever the input dtype;
# bf16/fp16 outputs differ by at most one ulp of the cast (the interpreter truncates fp32 -> bf16,
# GPUs round to nearest).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close(actual, expected):
    """|a - e| <= rtol * max|e|: near-zero entries of a dot product carry absolute, not relative, error."""
    rtol = RTOL[actual.dtype]
    expected = expected.to(actual.dtype).float()
    torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def poisoned(shape, dtype=torch.float32):
    """An output buffer full of NaN: anything the kernel fails to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(DEVICE, dtype)


def task_batch(gen, L, T, m, n, dtype):
    """finetuned [L, T, m, n] = base + a small dense task vector (never zero), in `dtype`."""
    base = randn(gen, L, m, n)
    finetuned = base.unsqueeze(1) + 0.1 * randn(gen, L, T, m, n)
    return finetuned.to(dtype), base.to(dtype)


# -- delta products --------------------------------------------------------------------
# (m, n, c): odd sizes off every block size; m < n with several column tiles of c.
DELTA_SHAPES = [pytest.param(77, 45, 13, id="77x45c13"), pytest.param(40, 96, 35, id="40x96c35")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,c", DELTA_SHAPES)
@pytest.mark.parametrize("L,T", BATCHES)
def test_delta_matmul(L, T, m, n, c, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    finetuned, base = task_batch(gen, L, T, m, n, dtype)
    x = randn(gen, L, T, n, c)
    out = D.delta_matmul(finetuned, base, x, out=poisoned((L, T, m, c)))
    assert_close(out, P.delta_matmul(finetuned, base, x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,c", DELTA_SHAPES)
@pytest.mark.parametrize("L,T", BATCHES)
def test_delta_matmul_t(L, T, m, n, c, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    finetuned, base = task_batch(gen, L, T, m, n, dtype)
    y = randn(gen, L, T, m, c, dtype=dtype)
    out = D.delta_matmul_t(finetuned, base, y, out=poisoned((L, T, n, c)))
    assert_close(out, P.delta_matmul_t(finetuned, base, y))


def test_delta_matmul_strided_inputs(seed):
    """Transposed-storage task matrices and a broadcast x or y (stride 0, as TorchBackend.sketch
    passes Omega, to delta_matmul_t when m > n)."""
    gen = torch.Generator().manual_seed(seed)
    L, T, m, n, c = 2, 3, 45, 77, 13
    finetuned_t, base_t = task_batch(gen, L, T, n, m, torch.float32)
    finetuned, base = finetuned_t.transpose(-1, -2), base_t.transpose(-1, -2)
    x = randn(gen, n, c).expand(L, T, n, c)
    assert_close(D.delta_matmul(finetuned, base, x, out=poisoned((L, T, m, c))), P.delta_matmul(finetuned, base, x))
    y = randn(gen, L, T, m, c)
    assert_close(D.delta_matmul_t(finetuned, base, y, out=poisoned((L, T, n, c))), P.delta_matmul_t(finetuned, base, y))
    y = randn(gen, m, c).expand(L, T, m, c)
    assert_close(D.delta_matmul_t(finetuned, base, y, out=poisoned((L, T, n, c))), P.delta_matmul_t(finetuned, base, y))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,c", DELTA_SHAPES)
@pytest.mark.parametrize("L,T", BATCHES)
def test_delta_sketch(L, T, m, n, c, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    finetuned, base = task_batch(gen, L, T, m, n, dtype)
    out = D.delta_sketch(finetuned, base, c, seed, out=poisoned((L, T, m, c)))
    omega = D.sketch_omega(n, c, seed, device=DEVICE)
    assert_close(out, P.delta_matmul(finetuned, base, omega.expand(L, T, n, c)))
    out = D.delta_sketch(finetuned, base, c, seed, transposed=True, out=poisoned((L, T, n, c)))
    omega = D.sketch_omega(m, c, seed, device=DEVICE)
    assert_close(out, P.delta_matmul_t(finetuned, base, omega.expand(L, T, m, c)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_products_of_task_vectors(dtype, seed):
    """base=None: `finetuned` already holds tau (what the engine passes)."""
    gen = torch.Generator().manual_seed(seed)
    L, T, m, n, c = 2, 3, 77, 45, 13
    tau = (0.1 * randn(gen, L, T, m, n)).to(dtype)
    x, y = randn(gen, L, T, n, c), randn(gen, L, T, m, c)
    assert_close(D.delta_matmul(tau, None, x, out=poisoned((L, T, m, c))), P.delta_matmul(tau, None, x))
    assert_close(D.delta_matmul_t(tau, None, y, out=poisoned((L, T, n, c))), P.delta_matmul_t(tau, None, y))
    omega = D.sketch_omega(n, c, seed, device=DEVICE).expand(L, T, n, c)
    assert_close(D.delta_sketch(tau, None, c, seed, out=poisoned((L, T, m, c))), P.delta_matmul(tau, None, omega))


def test_sketch_is_seeded_standard_normal():
    n, c = 4096, 16
    omega = D.sketch_omega(n, c, seed=7, device=DEVICE)
    assert torch.equal(omega, D.sketch_omega(n, c, seed=7, device=DEVICE))
    assert not torch.equal(omega, D.sketch_omega(n, c, seed=8, device=DEVICE))
    assert abs(omega.mean().item()) < 0.03
    # Independent unit-variance columns: sample covariance ~ I (standard error 1/64 per entry).
    torch.testing.assert_close(omega.T @ omega / n, torch.eye(c, device=DEVICE), rtol=0, atol=0.1)


# -- gram ---------------------------------------------------------------------------------
GRAM_DTYPES = [pytest.param(torch.float64, id="float64"), *DTYPES]


@pytest.mark.parametrize("dtype", GRAM_DTYPES)
@pytest.mark.parametrize("m,K", [pytest.param(77, 45, id="77x45"), pytest.param(50, 70, id="50x70")])
@pytest.mark.parametrize("lead", [pytest.param((1,), id="B1"), pytest.param((2, 3), id="B2x3")])
def test_gram(lead, m, K, dtype, seed):
    """fp64 panels (the engine's factor Grams on CUDA) accumulate in fp64, the rest in fp32."""
    x = randn(torch.Generator().manual_seed(seed), *lead, m, K, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = G.gram(x, out=poisoned((*lead, K, K), acc))
    assert out.dtype == acc
    assert_close(out, P.gram(x))


def test_gram_fits_shared_memory_in_every_dtype():
    """The autotuner never gets a config whose tiles exceed H100's shared memory (fp64 at
    BLOCK_M = 128 would: 256 KiB), and always keeps one."""
    configs = [triton.Config({"BLOCK_M": bm}, num_stages=s) for bm, s in [(32, 4), (128, 3)]]
    for dtype, kept in [(torch.float64, 1), (torch.float32, 2)]:
        nargs = {"x_ptr": torch.empty(0, dtype=dtype)}
        assert len(G._fit_shared_memory(configs, nargs, BLOCK_COLS=64)) == kept


# -- lowrank_apply ---------------------------------------------------------------------
LOWRANK_DTYPES = [pytest.param(i, o, id=f"{str(i)[6:]}-to-{str(o)[6:]}") for i, o in [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]]


def factors(gen, L, m, n, K, dtype):
    return (randn(gen, L, m, n, dtype=dtype), randn(gen, L, m, K, dtype=dtype),
            (torch.rand(L, K, generator=gen) + 0.5).to(DEVICE, dtype), randn(gen, L, n, K, dtype=dtype))


@pytest.mark.parametrize("in_dtype,out_dtype", LOWRANK_DTYPES)
@pytest.mark.parametrize("m,n,K", [pytest.param(77, 45, 13, id="77x45K13"), pytest.param(50, 96, 40, id="50x96K40")])
@pytest.mark.parametrize("L", [1, 2], ids=["L1", "L2"])
def test_lowrank_apply(L, m, n, K, in_dtype, out_dtype, seed):
    base, u, s, v = factors(torch.Generator().manual_seed(seed), L, m, n, K, in_dtype)
    out = LA.lowrank_apply(base, u, s, v, 0.7, out_dtype, out=poisoned((L, m, n), out_dtype))
    assert out.dtype == out_dtype
    assert_close(out, P.lowrank_apply(base, u, s, v, 0.7, torch.float32))


def test_lowrank_apply_into_strided_buffer_and_in_place(seed):
    L, m, n, K = 2, 77, 45, 13
    base, u, s, v = factors(torch.Generator().manual_seed(seed), L, m, n, K, torch.float32)
    expected = P.lowrank_apply(base, u, s, v, 0.7, torch.float32)
    buffer = poisoned((L, m, n + 7))
    LA.lowrank_apply(base, u, s, v, 0.7, torch.float32, out=buffer[..., :n])
    assert_close(buffer[..., :n], expected)
    assert buffer[..., n:].isnan().all()  # nothing written past the view
    LA.lowrank_apply(base, u, s, v, 0.7, torch.float32, out=base)  # each tile reads base before writing it
    assert_close(base, expected)


def test_launchers_reject_bad_inputs():
    x = torch.randn(1, 1, 8, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError):
        D.delta_matmul(x, x[:, 0], x.transpose(-1, -2))
    with pytest.raises(ValueError):
        D.delta_matmul(x.float(), x[:, 0].float(), torch.randn(1, 1, 5, 3, device=DEVICE))
    with pytest.raises(TypeError):
        G.gram(torch.ones(2, 8, 6, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError):
        LA.lowrank_apply(torch.randn(1, 8, 4, device=DEVICE), torch.randn(1, 8, 2, device=DEVICE),
                         torch.randn(1, 2, device=DEVICE), torch.randn(1, 4, 2, device=DEVICE), 1.0,
                         torch.float32, out=torch.empty(1, 8, 4, dtype=torch.bfloat16, device=DEVICE))


# -- backend -------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n", [pytest.param(77, 45, id="tall"), pytest.param(45, 77, id="wide")])
def test_backend_recovers_exact_low_rank_on_kernels_only(m, n, seed):
    """The range finder on the Triton hooks recovers a rank-4 task vector exactly, and every
    hook it calls runs its kernel (the sketch of tau^T too, when m > n)."""
    gen = torch.Generator().manual_seed(seed)
    L, T, rank = 1, 2, 4
    base = randn(gen, L, m, n)
    tau = randn(gen, L, T, m, rank) @ randn(gen, L, T, rank, n)
    backend = TritonBackend(device=DEVICE, seed=seed, oversample=4, power_iters=1)
    for svd in (backend.task_svd(base.unsqueeze(1) + tau, base, rank), backend.task_svd(tau, None, rank)):
        recon = (svd.u * svd.s.unsqueeze(-2)) @ svd.v.transpose(-1, -2)
        torch.testing.assert_close(recon, tau, rtol=1e-4, atol=1e-4 * tau.abs().max().item())
        assert torch.allclose(svd.energy, torch.ones_like(svd.energy), atol=1e-4)
    assert backend.describe()["fallbacks"] == {}


def test_backend_records_declined_inputs(seed):
    """An input a kernel does not take runs in torch, gives torch's result, and is counted
    with its reason in describe() (the merge report's backend section)."""
    gen = torch.Generator().manual_seed(seed)
    finetuned, base = (t.double() for t in task_batch(gen, 1, 2, 9, 7, torch.float32))
    x = randn(gen, 1, 2, 7, 3).double()
    backend = TritonBackend(device=DEVICE, compute_dtype=torch.float64)
    expected = TorchBackend().delta_matmul(finetuned, base, x)
    for _ in range(2):
        torch.testing.assert_close(backend.delta_matmul(finetuned, base, x), expected)
    b0, u, s, v = base.float(), randn(gen, 1, 9, 3), randn(gen, 1, 3), randn(gen, 1, 7, 3)
    out = backend.lowrank_apply(b0, u, s, v, 1.0, torch.float64)
    torch.testing.assert_close(out, P.lowrank_apply(b0, u, s, v, 1.0, torch.float64))
    assert backend.describe()["fallbacks"] == {"delta_matmul": {"dtype float64": 2},
                                               "lowrank_apply": {"out_dtype float64": 1}}


@pytest.mark.parametrize("compute_dtype, declined", [("float32", set()), ("float64", {"dtype float64"})])
def test_merge_report_names_what_fell_back(compute_dtype, declined, seed, monkeypatch, tmp_path):
    """A merge on the triton backend (the interpreter stands in for the GPU) reports what its
    kernels declined: none in fp32; in fp64 every product with the task matrices."""
    monkeypatch.setattr(tsvmerge.backends, "available", lambda name, device: True)
    base, tasks = random_zoo(seed % 1000, 3, {"blocks.0.w": (40, 24), "blocks.0.b": (24,)})
    tsvmerge.merge(base, tasks, backend="triton", device=DEVICE, compute_dtype=compute_dtype,
                   report=str(tmp_path / "r.json"), progress=False)
    report = json.loads((tmp_path / "r.json").read_text())
    fallbacks = report["backend"]["fallbacks"]
    assert {why for reasons in fallbacks.values() for why in reasons} == declined
    notes = [line for line in format_merge_report(report).splitlines() if "kernel declined" in line]
    assert len(notes) == sum(len(reasons) for reasons in fallbacks.values())
    if declined:
        assert {"sketch", "delta_matmul", "delta_matmul_t"} <= set(fallbacks)
        calls = fallbacks["delta_matmul"]["dtype float64"]
        assert f"note: triton kernel declined delta_matmul (dtype float64) {calls}x: ran in torch" in notes


# -- GPU code path, compiled without a GPU ---------------------------------------------------
def compile_for_sm90():
    """Compile each kernel variant for H100 (sm_90) to a cubin; needs no GPU. The Gram kernel:
    every config the autotuner may pick, in fp32 and fp64, within the shared memory limit."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_kernel(autotuned, types, constexprs, config=None):
        config = config or autotuned.configs[0]
        constexprs = {**constexprs, **config.kwargs}
        signature = {name: "constexpr" if name in constexprs else types.get(name, "i32")
                     for name in autotuned.fn.arg_names}
        return triton.compile(ASTSource(autotuned.fn, signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})

    # Contiguous strides are 1, which Triton specialises as a constant, as at run time.
    for ft, seeded, precision in [("fp32", True, "ieee"), ("bf16", False, "tf32")]:
        compile_kernel(D._delta_matmul_kernel, {"ft_ptr": f"*{ft}", "base_ptr": f"*{ft}", "x_ptr": "*fp32",
                                                "out_ptr": "*fp32", "stride_fl": "i64"},
                       {"HAS_BASE": not seeded, "SEEDED_OMEGA": seeded, "INPUT_PRECISION": precision,
                        "stride_ak": 1, "stride_bk": 1, "stride_xc": 1, "stride_oc": 1})
    for dtype, ty in [(torch.float32, "fp32"), (torch.float64, "fp64")]:
        nargs = {"x_ptr": torch.empty(0, dtype=dtype)}
        for config in G._fit_shared_memory(G._gram_kernel.configs, nargs, BLOCK_COLS=G.MAX_BLOCK_COLS):
            compiled = compile_kernel(G._gram_kernel, {"x_ptr": f"*{ty}", "out_ptr": f"*{ty}"},
                                      {"INPUT_PRECISION": "ieee", "BLOCK_COLS": G.MAX_BLOCK_COLS,
                                       "stride_xk": 1, "stride_oc": 1}, config)
            assert compiled.metadata.shared <= G.SHARED_MEMORY, (ty, config, compiled.metadata.shared)
    lowrank_types = {f"{name}_ptr": "*bf16" for name in ("base", "u", "s", "v", "out")} | {"alpha": "fp32"}
    compile_kernel(LA._lowrank_apply_kernel, lowrank_types,
                   {"INPUT_PRECISION": "ieee", "stride_bn": 1, "stride_uk": 1, "stride_vk": 1, "stride_on": 1})


def test_kernels_compile_for_sm90():
    """The interpreter never compiles; a child process without it lowers the kernels to sm_90 cubins."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); " \
           "import test_triton_kernels as t; t.compile_for_sm90()"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("this triton install has no ptxas to lower to sm_90")
    assert result.returncode == 0, result.stderr[-4000:]

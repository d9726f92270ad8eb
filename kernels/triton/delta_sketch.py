"""Fused (theta_i - theta_0) @ x, its transpose and seeded sketch: match primitives.delta_matmul / delta_matmul_t."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _configs():
    if INTERPRET:  # one small config: the interpreter runs every program in numpy
        return [triton.Config({"BLOCK_M": 32, "BLOCK_C": 16, "BLOCK_K": 16})]
    # c = k + p is ~64, so BLOCK_C = 64 reads every tau tile once; BLOCK_M >= 128 amortises the
    # Omega tile that each program regenerates (Philox costs more than the FMAs it feeds).
    shapes = [(64, 64, 32, 4, 4), (128, 64, 32, 4, 4), (128, 64, 64, 8, 3), (256, 64, 32, 8, 3),
              (128, 32, 64, 4, 3), (128, 128, 32, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_C": bc, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bc, bk, w, s in shapes]


# stride_ak tells tau (K contiguous) from tau^T (M contiguous): they want different tiles.
@triton.autotune(configs=_configs(), key=["M", "K", "C", "stride_ak"])
@triton.jit
def _delta_matmul_kernel(
    ft_ptr, base_ptr, x_ptr, out_ptr, seed,
    M, K, C, T,
    stride_fl, stride_ft, stride_am, stride_ak,   # finetuned [L, T, ., .] read as A [M, K]
    stride_bl, stride_bm, stride_bk,              # base [L, ., .] read as [M, K]
    stride_xl, stride_xt, stride_xk, stride_xc,   # x [L, T, K, C]
    stride_ol, stride_ot, stride_om, stride_oc,   # out [L, T, M, C]
    HAS_BASE: tl.constexpr, SEEDED_OMEGA: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[l, t] = (A_ft[l, t] - A_base[l]) @ x[l, t], or A_ft[l, t] @ x[l, t] without a base.

    With SEEDED_OMEGA, x is Omega[K, C] drawn from Philox in registers.
    """
    c_tiles = tl.cdiv(C, BLOCK_C)
    rows = (tl.program_id(0) // c_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    # int64: at ViT-L x 20 tasks, layer * stride_fl passes 2^31.
    layer = (tl.program_id(1) // T).to(tl.int64)
    task = (tl.program_id(1) % T).to(tl.int64)
    ft_ptr += layer * stride_fl + task * stride_ft
    base_ptr += layer * stride_bl
    x_ptr += layer * stride_xl + task * stride_xt

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a_mask = (rows[:, None] < M) & (ks[None, :] < K)
        tau = tl.load(ft_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak, mask=a_mask, other=0.0)
        tau = tau.to(tl.float32)
        if HAS_BASE:
            base = tl.load(base_ptr + rows[:, None] * stride_bm + ks[None, :] * stride_bk, mask=a_mask, other=0.0)
            tau -= base.to(tl.float32)
        if SEEDED_OMEGA:
            # Omega[k, c] = randn(seed, k * C + c); entries past K or C meet zero tau or are not stored.
            x = tl.randn(seed, ks[:, None] * C + cols[None, :])
        else:
            x_mask = (ks[:, None] < K) & (cols[None, :] < C)
            x = tl.load(x_ptr + ks[:, None] * stride_xk + cols[None, :] * stride_xc, mask=x_mask, other=0.0)
            x = x.to(tl.float32)
        acc = tl.dot(tau, x, acc, input_precision=INPUT_PRECISION)

    out_ptr += layer * stride_ol + task * stride_ot
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_oc, acc,
             mask=(rows[:, None] < M) & (cols[None, :] < C))


@triton.jit
def _omega_kernel(out_ptr, seed, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.randn(seed, offsets), mask=offsets < numel)


def _check_inputs(finetuned, base, *others):
    for t in (finetuned, base, *others):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"triton delta kernels take fp32/bf16/fp16, not {t.dtype}")
    L, T, m, n = finetuned.shape
    if base is not None and base.shape != (L, m, n):
        raise ValueError(f"base {tuple(base.shape)} does not match finetuned {tuple(finetuned.shape)}")


def _output(out, shape, device):
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if out.shape != shape or out.dtype != torch.float32 or out.device != device:
        raise ValueError(f"out must be fp32 {tuple(shape)} on {device}, got {out.dtype} {tuple(out.shape)}")
    return out


def _launch(finetuned, base, x, c, seed, transpose, out, input_precision):
    """A = tau (or tau^T when transpose) times x, or times the seeded Omega when x is None."""
    L, T, m, n = finetuned.shape
    M, K = (n, m) if transpose else (m, n)
    out = _output(out, (L, T, M, c), finetuned.device)
    if out.numel() == 0:
        return out
    fs = finetuned.stride()
    bs = (0, 0, 0) if base is None else base.stride()
    a_strides = (fs[3], fs[2]) if transpose else (fs[2], fs[3])
    b_strides = (bs[2], bs[1]) if transpose else (bs[1], bs[2])
    seeded = x is None
    x_strides = (0, 0, 0, 0) if seeded else x.stride()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(c, meta["BLOCK_C"]), L * T)
    _delta_matmul_kernel[grid](
        # Unused pointers (no base, seeded Omega) are given `finetuned`, never read.
        finetuned, finetuned if base is None else base, finetuned if seeded else x, out, seed,
        M, K, c, T,
        fs[0], fs[1], *a_strides,
        bs[0], *b_strides,
        *x_strides,
        *out.stride(),
        HAS_BASE=base is not None, SEEDED_OMEGA=seeded, INPUT_PRECISION=input_precision,
    )
    return out


def delta_matmul(finetuned, base, x, *, out=None, input_precision="ieee"):
    """(theta_i - theta_0) @ x: finetuned [L, T, m, n], base [L, m, n], x [L, T, n, c] -> fp32 [L, T, m, c].

    base=None: finetuned already holds the task vectors.
    """
    _check_inputs(finetuned, base, x)
    L, T, m, n = finetuned.shape
    if x.shape[:3] != (L, T, n):
        raise ValueError(f"x {tuple(x.shape)} does not match finetuned {tuple(finetuned.shape)}")
    return _launch(finetuned, base, x, x.shape[3], 0, False, out, input_precision)


def delta_matmul_t(finetuned, base, y, *, out=None, input_precision="ieee"):
    """(theta_i - theta_0)^T @ y: finetuned [L, T, m, n], base [L, m, n], y [L, T, m, c] -> fp32 [L, T, n, c]."""
    _check_inputs(finetuned, base, y)
    L, T, m, n = finetuned.shape
    if y.shape[:3] != (L, T, m):
        raise ValueError(f"y {tuple(y.shape)} does not match finetuned {tuple(finetuned.shape)}")
    return _launch(finetuned, base, y, y.shape[3], 0, True, out, input_precision)


def delta_sketch(finetuned, base, c, seed, *, transposed=False, out=None, input_precision="ieee"):
    """(theta_i - theta_0) @ Omega with Omega = sketch_omega(n, c, seed), never materialised -> fp32 [L, T, m, c];
    transposed: (theta_i - theta_0)^T @ Omega with Omega = sketch_omega(m, c, seed) -> fp32 [L, T, n, c]."""
    _check_inputs(finetuned, base)
    return _launch(finetuned, base, None, int(c), int(seed), bool(transposed), out, input_precision)


def sketch_omega(n, c, seed, device=None):
    """The Omega [n, c] (fp32) that delta_sketch generates in registers; for tests and debugging."""
    omega = torch.empty(n, c, dtype=torch.float32, device=device)
    block = 1024
    _omega_kernel[(triton.cdiv(omega.numel(), block),)](omega, int(seed), omega.numel(), BLOCK=block)
    return omega

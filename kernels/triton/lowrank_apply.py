"""Fused cast(theta_0 + alpha * U diag(s) V^T) into the output buffer: matches tsvmerge.primitives.lowrank_apply."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16})]
    shapes = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4),
              (128, 256, 32, 8, 3), (128, 128, 64, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


# restore_value: tuning reruns the kernel, and out may alias base (an in-place merge).
@triton.autotune(configs=_configs(), key=["M", "N", "K"], restore_value=["out_ptr"])
@triton.jit
def _lowrank_apply_kernel(
    base_ptr, u_ptr, s_ptr, v_ptr, out_ptr, alpha,
    M, N, K,
    stride_bl, stride_bm, stride_bn,      # base [L, M, N]
    stride_ul, stride_um, stride_uk,      # u [L, M, K]
    stride_sl, stride_sk,                 # s [L, K]
    stride_vl, stride_vn, stride_vk,      # v [L, N, K]
    stride_ol, stride_om, stride_on,      # out [L, M, N]
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n_tiles = tl.cdiv(N, BLOCK_N)
    rows = (tl.program_id(0) // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    layer = tl.program_id(1).to(tl.int64)  # int64: layer * stride_bl can pass 2^31
    u_ptr += layer * stride_ul
    s_ptr += layer * stride_sl
    v_ptr += layer * stride_vl

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        u = tl.load(u_ptr + rows[:, None] * stride_um + ks[None, :] * stride_uk,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        s = tl.load(s_ptr + ks * stride_sk, mask=ks < K, other=0.0)
        v_t = tl.load(v_ptr + ks[:, None] * stride_vk + cols[None, :] * stride_vn,
                      mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        us = u.to(tl.float32) * s.to(tl.float32)[None, :]
        acc = tl.dot(us, v_t.to(tl.float32), acc, input_precision=INPUT_PRECISION)

    # Epilogue: the base tile is read once, here, and the result written once in its final dtype.
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    base = tl.load(base_ptr + layer * stride_bl + rows[:, None] * stride_bm + cols[None, :] * stride_bn,
                   mask=mask, other=0.0)
    result = base.to(tl.float32) + alpha * acc
    out_ptr += layer * stride_ol
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             result.to(out_ptr.dtype.element_ty), mask=mask)


def lowrank_apply(base, u, s, v, alpha, out_dtype, *, out=None, input_precision="ieee"):
    """cast(theta_0 + alpha * U diag(s) V^T): base [L, m, n], u [L, m, K], s [L, K], v [L, n, K] -> out_dtype [L, m, n].

    out: an existing [L, m, n] buffer of out_dtype (any strides) to write into.
    """
    for t in (base, u, s, v):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"triton lowrank_apply takes fp32/bf16/fp16, not {t.dtype}")
    L, m, n = base.shape
    K = u.shape[-1]
    if u.shape != (L, m, K) or s.shape != (L, K) or v.shape != (L, n, K):
        raise ValueError(f"factors u {tuple(u.shape)}, s {tuple(s.shape)}, v {tuple(v.shape)} "
                         f"do not match base {tuple(base.shape)}")
    if out is None:
        out = torch.empty((L, m, n), dtype=out_dtype, device=base.device)
    elif out.shape != base.shape or out.dtype != out_dtype or out.device != base.device:
        raise ValueError(f"out must be {out_dtype} {tuple(base.shape)} on {base.device}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    if out.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton lowrank_apply writes fp32/bf16/fp16, not {out.dtype}")
    if out.numel() == 0:
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), L)
    _lowrank_apply_kernel[grid](
        base, u, s, v, out, float(alpha),
        m, n, K,
        *base.stride(), *u.stride(), *s.stride(), *v.stride(), *out.stride(),
        INPUT_PRECISION=input_precision,
    )
    return out

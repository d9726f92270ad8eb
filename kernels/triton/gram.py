"""Fused Gram x^T x of tall-skinny panels from its upper tile triangle: matches primitives.gram.

fp64 panels accumulate in fp64 (Triton's tl.dot takes fp64 operands: DMMA on sm_80+, the
interpreter in numpy): the engine forms the Grams of the concatenated factors in fp64, where
tasks that share directions make them ill-conditioned. Everything else accumulates in fp32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Widest column tile.
MAX_BLOCK_COLS = 32 if INTERPRET else 64
SHARED_MEMORY = 227 * 1024  # per block on H100/H200 (opt-in)


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32})]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm, w, s in [(32, 4, 4), (64, 4, 4), (64, 4, 3), (128, 4, 3), (128, 8, 3)]]


def shared_bytes(config, block_cols, element_size):
    """Shared memory of a config: two x tiles per pipeline stage but one (sm_90 cubins: fp64 at
    BLOCK_M = 128 and 3 stages takes 256 KiB, over the limit; fp32 half that)."""
    return 2 * block_cols * config.kwargs["BLOCK_M"] * element_size * max(1, config.num_stages - 1)


def _fit_shared_memory(configs, nargs, **kwargs):
    size = nargs["x_ptr"].element_size()
    return [c for c in configs if shared_bytes(c, kwargs["BLOCK_COLS"], size) <= SHARED_MEMORY]


@triton.autotune(configs=_configs(), key=["M", "K", "BLOCK_COLS"],
                 prune_configs_by={"early_config_prune": _fit_shared_memory})
@triton.jit
def _gram_kernel(
    x_ptr, out_ptr,
    M, K,                                    # x [B, M, K]
    stride_xb, stride_xm, stride_xk,
    stride_ob, stride_or, stride_oc,
    INPUT_PRECISION: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One column-tile pair (i <= j) of x^T x, stored at (i, j) and mirrored to (j, i)."""
    num_tiles = tl.cdiv(K, BLOCK_COLS)
    ti = tl.program_id(0) // num_tiles
    tj = tl.program_id(0) % num_tiles
    if ti > tj:  # the lower triangle is written by its mirror
        return
    cols_i = ti * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    cols_j = tj * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * stride_xb
    out_ptr += batch * stride_ob

    acc_dtype = out_ptr.dtype.element_ty  # fp64 for fp64 panels, else fp32
    acc = tl.zeros((BLOCK_COLS, BLOCK_COLS), dtype=acc_dtype)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        xi_t = tl.load(x_ptr + rows[None, :] * stride_xm + cols_i[:, None] * stride_xk,
                       mask=(cols_i[:, None] < K) & (rows[None, :] < M), other=0.0)
        xj = tl.load(x_ptr + rows[:, None] * stride_xm + cols_j[None, :] * stride_xk,
                     mask=(rows[:, None] < M) & (cols_j[None, :] < K), other=0.0)
        acc = tl.dot(xi_t.to(acc_dtype), xj.to(acc_dtype), acc, input_precision=INPUT_PRECISION)

    mask = (cols_i[:, None] < K) & (cols_j[None, :] < K)
    tl.store(out_ptr + cols_i[:, None] * stride_or + cols_j[None, :] * stride_oc, acc, mask=mask)
    if ti != tj:
        tl.store(out_ptr + cols_j[None, :] * stride_or + cols_i[:, None] * stride_oc, acc, mask=mask)


def gram(x, *, out=None, input_precision="ieee"):
    """x^T x for panels x [..., m, K] -> [..., K, K], fp64 for fp64 x, else fp32.

    input_precision applies to fp32 dots ("tf32" uses tensor cores); fp64 dots are exact-fp64.
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton gram takes fp64/fp32/bf16/fp16, not {x.dtype}")
    *lead, m, K = x.shape
    shape, acc = (*lead, K, K), torch.float64 if x.dtype == torch.float64 else torch.float32
    if out is None:
        out = torch.empty(shape, dtype=acc, device=x.device)
    elif out.shape != shape or out.dtype != acc or out.device != x.device:
        raise ValueError(f"out must be {acc} {shape} on {x.device}, got {out.dtype} {tuple(out.shape)}")
    if out.numel() == 0:
        return out
    x3, out3 = x.reshape(-1, m, K), out.view(-1, K, K)
    block_cols = min(MAX_BLOCK_COLS, max(16, triton.next_power_of_2(K)))  # tl.dot needs >= 16
    num_tiles = triton.cdiv(K, block_cols)
    _gram_kernel[(num_tiles * num_tiles, x3.shape[0])](
        x3, out3, m, K,
        *x3.stride(), *out3.stride(),
        INPUT_PRECISION="ieee" if acc == torch.float64 else input_precision,
        BLOCK_COLS=block_cols,
    )
    return out

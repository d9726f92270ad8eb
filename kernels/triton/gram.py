"""Fused Gram x^T x of tall-skinny panels, optionally skipping identity task blocks: matches primitives.gram."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Widest column tile; a task block wider than this is split into several tiles.
MAX_BLOCK_COLS = 32 if INTERPRET else 64


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32})]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm, w, s in [(32, 4, 4), (64, 4, 4), (64, 4, 3), (128, 4, 3), (128, 8, 3)]]


@triton.autotune(configs=_configs(), key=["M", "K", "GROUP", "BLOCK_COLS"])
@triton.jit
def _gram_kernel(
    x_ptr, out_ptr,
    M, K, GROUP,                             # x [B, M, K]: K // GROUP column groups of GROUP columns
    stride_xb, stride_xm, stride_xk,
    stride_ob, stride_or, stride_oc,
    DIAG_IS_IDENTITY: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_COLS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One column-tile pair (i <= j) of x^T x, stored at (i, j) and mirrored to (j, i)."""
    tiles_per_group = tl.cdiv(GROUP, BLOCK_COLS)
    num_tiles = (K // GROUP) * tiles_per_group
    ti = tl.program_id(0) // num_tiles
    tj = tl.program_id(0) % num_tiles
    if ti > tj:  # the lower triangle is written by its mirror
        return
    # Column indices of each tile and whether they fall inside its group (the last tile is partial).
    local_i = (ti % tiles_per_group) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    local_j = (tj % tiles_per_group) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    cols_i = (ti // tiles_per_group) * GROUP + local_i
    cols_j = (tj // tiles_per_group) * GROUP + local_j
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * stride_xb
    out_ptr += batch * stride_ob

    # Orthonormal panels have x_g^T x_g = I: no reduction for diagonal groups (zero trips).
    same_group = (ti // tiles_per_group) == (tj // tiles_per_group)
    m_end = tl.where(DIAG_IS_IDENTITY and same_group, 0, M)
    acc = tl.zeros((BLOCK_COLS, BLOCK_COLS), dtype=tl.float32)
    for m0 in range(0, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        xi_t = tl.load(x_ptr + rows[None, :] * stride_xm + cols_i[:, None] * stride_xk,
                       mask=(local_i[:, None] < GROUP) & (rows[None, :] < M), other=0.0)
        xj = tl.load(x_ptr + rows[:, None] * stride_xm + cols_j[None, :] * stride_xk,
                     mask=(rows[:, None] < M) & (local_j[None, :] < GROUP), other=0.0)
        acc = tl.dot(xi_t.to(tl.float32), xj.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    if DIAG_IS_IDENTITY:
        acc = tl.where(same_group, (cols_i[:, None] == cols_j[None, :]).to(tl.float32), acc)

    mask = (local_i[:, None] < GROUP) & (local_j[None, :] < GROUP)
    tl.store(out_ptr + cols_i[:, None] * stride_or + cols_j[None, :] * stride_oc, acc, mask=mask)
    if ti != tj:
        tl.store(out_ptr + cols_j[None, :] * stride_or + cols_i[:, None] * stride_oc, acc, mask=mask)


def gram(x, *, task_block=None, out=None, input_precision="ieee"):
    """x^T x for panels x [..., m, K] -> fp32 [..., K, K].

    task_block=k: x is K // k orthonormal panels of k columns (one per task); their diagonal
    blocks are set to I and only the off-diagonal blocks are computed.
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton gram takes fp32/bf16/fp16, not {x.dtype}")
    *lead, m, K = x.shape
    group = K if task_block is None else int(task_block)
    if group <= 0 or K % group:
        raise ValueError(f"task_block={task_block} does not divide the {K} columns")
    shape = (*lead, K, K)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    elif out.shape != shape or out.dtype != torch.float32 or out.device != x.device:
        raise ValueError(f"out must be fp32 {shape} on {x.device}, got {out.dtype} {tuple(out.shape)}")
    if out.numel() == 0:
        return out
    x3, out3 = x.reshape(-1, m, K), out.view(-1, K, K)
    block_cols = min(MAX_BLOCK_COLS, max(16, triton.next_power_of_2(group)))  # tl.dot needs >= 16
    num_tiles = (K // group) * triton.cdiv(group, block_cols)
    _gram_kernel[(num_tiles * num_tiles, x3.shape[0])](
        x3, out3, m, K, group,
        *x3.stride(), *out3.stride(),
        DIAG_IS_IDENTITY=task_block is not None, INPUT_PRECISION=input_precision,
        BLOCK_COLS=block_cols,
    )
    return out

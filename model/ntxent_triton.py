"""Fused Triton backend of ``model.ntxent``: ``row_lse`` and ``row_grad`` without the rows x columns matrix.

Same two functions, same semantics as ``model.ntxent._chunked`` (see there and ``model/ntxent.py``'s
docstring); flash-attention style: one program per block of rows loops over blocks of columns, the
scores tile lives in registers only, no atomics.

- ``row_lse``: per row, log sum_{j != own column} exp(s_ij / tau), with the fixed shift c = 1/tau
  (unit rows: every logit <= 1/tau, so each exp(s/tau - c) <= 1; one exp per pair, no running max).
- ``row_grad``: per row k, sum_j (p_kj + p_jk) c_j over the columns j other than k's own and its
  positive, with E = exp(s/tau - c) once per pair and weights E * (a_k + b_j), a = exp(c - lse_rows),
  b = exp(c - lse_columns). The output's d dimension is split across programs (BLOCK_D) and each
  program recomputes its scores, so d = 2048 needs no (rows x d) tile per program.

Precision: the dot products accumulate in float32 (float64 for float64 inputs, whose statistics are
then float64, as ``model.ntxent.accumulation_dtype`` has it). For float32 inputs they run with
``FP32_DOT_PRECISION`` (default "ieee": no silent TF32 where exactness is checked; "tf32" trades ~1e-3 relative
accuracy for tensor-core speed). For bfloat16 inputs the
gradient's weights are rounded to bfloat16 for the second tensor-core product (as flash attention does
with P); for float16 inputs the weights stay float32 (float16 would underflow p ~ 1/M at large batches)
and that product runs in TF32.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is imported). The interpreter's ``tl.dot`` multiplies the raw bit patterns of bfloat16
(numpy has no bfloat16: it stores them as uint16), so under the interpreter 16-bit tiles are widened to
float32 before each product (exact: a product of two bfloat16 is exact in float32), and the
gradient's weights are rounded through bfloat16 first, as on the GPU (the interpreter's conversion
truncates where the GPU rounds to nearest: the interpreter's bfloat16 errors are, if anything, larger).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

# Input precision of tl.dot for float32 inputs ("ieee", "tf32x3" or "tf32"); read at each call.
FP32_DOT_PRECISION = "ieee"

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _scores(q, rows_ptr, cols_ptr, offs_m, offs_n, row_ok, col_ok, D, stride_r, stride_c,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_K: tl.constexpr,
            UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """(BLOCK_M, BLOCK_N) dot products of a row block with a column block, accumulated in ACC. With
    ONE_K, ``q`` is the row tile already loaded (d <= BLOCK_K); otherwise d is walked in BLOCK_K chunks."""
    offs_k = tl.arange(0, BLOCK_K)
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    if ONE_K:
        k = tl.load(cols_ptr + offs_n.to(tl.int64)[:, None] * stride_c + offs_k[None, :],
                    mask=col_ok[:, None] & (offs_k[None, :] < D), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), s, input_precision=PRECISION)
    else:
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(rows_ptr + offs_m.to(tl.int64)[:, None] * stride_r + kk[None, :],
                        mask=row_ok[:, None] & (kk[None, :] < D), other=0.0)
            b = tl.load(cols_ptr + offs_n.to(tl.int64)[:, None] * stride_c + kk[None, :],
                        mask=col_ok[:, None] & (kk[None, :] < D), other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            s = tl.dot(a, tl.trans(b), s, input_precision=PRECISION)
    return s


@triton.jit
def _load_rows(rows_ptr, offs_m, row_ok, D, stride_r, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    q = tl.load(rows_ptr + offs_m.to(tl.int64)[:, None] * stride_r + offs_k[None, :],
                mask=row_ok[:, None] & (offs_k[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _row_lse_kernel(rows_ptr, cols_ptr, out_ptr, consts_ptr, m, M, D, row_offset,
                    stride_r, stride_c,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_K: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    inv_temp = tl.load(consts_ptr)  # 1/tau and log2(e)/tau, in ACC (a float64 run keeps them exact)
    scale_log2 = tl.load(consts_ptr + 1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < m
    own = row_offset + offs_m  # each row's own column (the diagonal)
    q = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    if ONE_K:
        q = _load_rows(rows_ptr, offs_m, row_ok, D, stride_r, BLOCK_K, UPCAST)
    total = tl.zeros([BLOCK_M], dtype=ACC)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        s = _scores(q, rows_ptr, cols_ptr, offs_m, offs_n, row_ok, col_ok, D, stride_r, stride_c,
                    BLOCK_M, BLOCK_N, BLOCK_K, ONE_K, UPCAST, PRECISION, ACC)
        # exp(s/tau - 1/tau) = 2^((s - 1) * log2(e)/tau) <= 1; the diagonal and padding masked by index.
        e = tl.exp2((s - 1.0) * scale_log2)
        keep = col_ok[None, :] & (offs_n[None, :] != own[:, None])
        total += tl.sum(tl.where(keep, e, 0.0), axis=1)
    tl.store(out_ptr + offs_m, inv_temp + tl.log(total), mask=row_ok)


@triton.jit
def _row_grad_kernel(rows_ptr, cols_ptr, lse_rows_ptr, lse_cols_ptr, pos_ptr, out_ptr, consts_ptr,
                     m, M, D, row_offset,
                     stride_r, stride_c, stride_o,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     ONE_K: tl.constexpr, SHARE: tl.constexpr, UPCAST: tl.constexpr, W_LOW: tl.constexpr,
                     PRECISION: tl.constexpr, W_PRECISION: tl.constexpr, ACC: tl.constexpr):
    inv_temp = tl.load(consts_ptr)
    scale_log2 = tl.load(consts_ptr + 1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = offs_m < m
    own = row_offset + offs_m
    pos = tl.load(pos_ptr + offs_m, mask=row_ok, other=-1)
    # a_k = exp(c - lse_k) (0 for padding rows); with E = exp(s/tau - c): p_kj = E a_k, p_jk = E b_j.
    a = tl.exp(inv_temp - tl.load(lse_rows_ptr + offs_m, mask=row_ok, other=float("inf")))
    q = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    if ONE_K:
        q = _load_rows(rows_ptr, offs_m, row_ok, D, stride_r, BLOCK_K, UPCAST)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        col_base = cols_ptr + offs_n.to(tl.int64)[:, None] * stride_c
        if SHARE:
            # d fits one tile and one program covers it: the column tile serves both products.
            v = tl.load(col_base + offs_d[None, :], mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            if UPCAST:
                s = tl.dot(q, tl.trans(v.to(tl.float32)), input_precision=PRECISION)
            else:
                s = tl.dot(q, tl.trans(v), input_precision=PRECISION)
        else:
            s = _scores(q, rows_ptr, cols_ptr, offs_m, offs_n, row_ok, col_ok, D, stride_r, stride_c,
                        BLOCK_M, BLOCK_N, BLOCK_K, ONE_K, UPCAST, PRECISION, ACC)
            v = tl.load(col_base + offs_d[None, :], mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        e = tl.exp2((s - 1.0) * scale_log2)
        b = tl.exp(inv_temp - tl.load(lse_cols_ptr + offs_n, mask=col_ok, other=float("inf")))
        keep = (col_ok[None, :] & (offs_n[None, :] != own[:, None])
                & (offs_n[None, :].to(tl.int64) != pos[:, None].to(tl.int64)))
        w = tl.where(keep, e * (a[:, None] + b[None, :]), 0.0)
        if W_LOW:
            # 16-bit weights for the tensor-core product (bfloat16 inputs).
            w = w.to(v.dtype)
            if UPCAST:
                w = w.to(tl.float32)
                v = v.to(tl.float32)
        else:
            v = v.to(ACC)
        acc = tl.dot(w, v, acc, input_precision=W_PRECISION)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_o + offs_d[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & (offs_d[None, :] < D))


# --------------------------------------------------------------------------- launch


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _config(d: int, dtype: torch.dtype) -> dict:
    """Tile sizes. On the GPU (compiled with ptxas for sm_90: at most 8 bytes of register spill at
    d <= 128, 32-40 bytes in the gradient kernel at d > 128 with 16-bit inputs): 16-bit
    inputs keep d <= 128 in one K tile (the row tile stays in registers, the column tile serves both
    products), larger d is walked in 64-wide chunks and the gradient's output split in 128-wide slices;
    float32 ("ieee" products on FMA units) walks d in 32-wide chunks with 64-wide output slices, float64
    likewise with 32-wide tiles. Under the interpreter: small tiles, so that tests cover several
    row/column/K/d tiles with few rows."""
    if _INTERPRET:
        k = 32 if d <= 128 else 256
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=k, BLOCK_D=k, GRAD_BLOCK_M=16, num_warps=1, num_stages=1)
    if dtype == torch.float64:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=max(16, _pow2(d)) if d <= 16 else 16,
                    BLOCK_D=max(16, _pow2(d)) if d <= 32 else 32, GRAD_BLOCK_M=32, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=max(16, _pow2(d)) if d <= 32 else 32,
                    BLOCK_D=max(16, _pow2(d)) if d <= 64 else 64, GRAD_BLOCK_M=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=max(16, _pow2(d)) if d <= 128 else 64,
                BLOCK_D=max(16, _pow2(d)) if d <= 128 else 128, GRAD_BLOCK_M=64, num_warps=8, num_stages=3)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check(rows: torch.Tensor, columns: torch.Tensor, row_offset: int):
    if rows.ndim != 2 or columns.ndim != 2 or rows.shape[1] != columns.shape[1]:
        raise ValueError(f"rows (m, d) and columns (M, d) expected, got {tuple(rows.shape)} and {tuple(columns.shape)}")
    if rows.dtype != columns.dtype or rows.dtype not in _DTYPES:
        raise TypeError(f"rows and columns must share a float32/bfloat16/float16/float64 dtype, got {rows.dtype}, {columns.dtype}")
    if not 0 <= row_offset <= columns.shape[0] - rows.shape[0]:
        raise ValueError(f"row_offset {row_offset} out of range for {rows.shape[0]} rows in {columns.shape[0]} columns")
    if not _INTERPRET and not (rows.is_cuda and columns.is_cuda):
        raise ValueError("the Triton NT-Xent backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if rows.device != columns.device:
        raise ValueError(f"rows on {rows.device}, columns on {columns.device}")


def _accumulation(dtype: torch.dtype) -> tuple[torch.dtype, object]:
    """(torch dtype, Triton dtype) of the statistics: float64 for float64 inputs, float32 otherwise
    (as ``model.ntxent.accumulation_dtype``)."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _precisions(dtype: torch.dtype) -> tuple[bool, bool, str, str]:
    """(UPCAST, W_LOW, PRECISION, W_PRECISION) for an input dtype."""
    if dtype == torch.float32:
        return False, False, FP32_DOT_PRECISION, FP32_DOT_PRECISION
    if dtype == torch.float64:
        return False, False, "ieee", "ieee"
    upcast = _INTERPRET  # see the module docstring: the interpreter's tl.dot cannot take 16-bit tiles
    precision = "ieee" if upcast else "tf32"  # float32 operands only under the interpreter / fp16 weights
    return upcast, dtype == torch.bfloat16, precision, precision


@functools.lru_cache(maxsize=64)
def _consts(inv_temp: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1/tau, log2(e)/tau] as a (cached, read-only) device tensor of the accumulation dtype: Triton
    would round scalar float arguments to float32, which a float64 run must not do."""
    consts = torch.empty(2, dtype=dtype, device=device)
    consts[0], consts[1] = inv_temp, inv_temp * _LOG2E  # device fills, no host-to-device copy
    return consts


def row_lse(rows: torch.Tensor, columns: torch.Tensor, row_offset: int, inv_temp: float) -> torch.Tensor:
    """(m,) in the accumulation dtype (float32; float64 for float64 inputs): per row i,
    log sum_{j != row_offset + i} exp(inv_temp * <rows_i, columns_j>)."""
    _check(rows, columns, row_offset)
    rows, columns = rows.contiguous(), columns.contiguous()
    m, d = rows.shape
    acc_dtype, acc_tl = _accumulation(rows.dtype)
    out = torch.empty(m, dtype=acc_dtype, device=rows.device)
    if m == 0:
        return out
    cfg = _config(d, rows.dtype)
    upcast, _, precision, _ = _precisions(rows.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
    _row_lse_kernel[grid](
        rows, columns, out, _consts(float(inv_temp), acc_dtype, rows.device), m, columns.shape[0], d, int(row_offset),
        rows.stride(0), columns.stride(0),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], ONE_K=d <= cfg["BLOCK_K"],
        UPCAST=upcast, PRECISION=precision, ACC=acc_tl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def row_grad(rows: torch.Tensor, columns: torch.Tensor, lse_rows: torch.Tensor, lse_columns: torch.Tensor,
             positives: torch.Tensor, row_offset: int, inv_temp: float) -> torch.Tensor:
    """(m, d) in the accumulation dtype: per row k, sum_j (p_kj + p_jk) columns_j over j other than
    row_offset + k and positives[k], with p_kj = exp(inv_temp s_kj - lse_rows[k]) and
    p_jk = exp(inv_temp s_kj - lse_columns[j])."""
    _check(rows, columns, row_offset)
    rows, columns = rows.contiguous(), columns.contiguous()
    m, d = rows.shape
    M = columns.shape[0]
    if lse_rows.shape != (m,) or lse_columns.shape != (M,) or positives.shape != (m,):
        raise ValueError(f"lse_rows ({m},), lse_columns ({M},) and positives ({m},) expected, got "
                         f"{tuple(lse_rows.shape)}, {tuple(lse_columns.shape)}, {tuple(positives.shape)}")
    acc_dtype, acc_tl = _accumulation(rows.dtype)
    lse_rows = lse_rows.to(device=rows.device, dtype=acc_dtype).contiguous()
    lse_columns = lse_columns.to(device=rows.device, dtype=acc_dtype).contiguous()
    positives = positives.to(device=rows.device, dtype=torch.int64).contiguous()
    out = torch.empty((m, d), dtype=acc_dtype, device=rows.device)
    if m == 0 or d == 0:
        return out
    cfg = _config(d, rows.dtype)
    upcast, w_low, precision, w_precision = _precisions(rows.dtype)
    one_k = d <= cfg["BLOCK_K"]
    d_programs = triton.cdiv(d, cfg["BLOCK_D"])
    grid = (triton.cdiv(m, cfg["GRAD_BLOCK_M"]), d_programs)
    _row_grad_kernel[grid](
        rows, columns, lse_rows, lse_columns, positives, out, _consts(float(inv_temp), acc_dtype, rows.device),
        m, M, d, int(row_offset),
        rows.stride(0), columns.stride(0), out.stride(0),
        BLOCK_M=cfg["GRAD_BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
        ONE_K=one_k, SHARE=one_k and d_programs == 1 and cfg["BLOCK_D"] == cfg["BLOCK_K"],
        UPCAST=upcast, W_LOW=w_low, PRECISION=precision, W_PRECISION=w_precision, ACC=acc_tl,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out

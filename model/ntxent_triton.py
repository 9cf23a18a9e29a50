"""Fused Triton backend of ``model.ntxent``: the loss and its gradient without the rows x columns matrix.

The same five functions and semantics as ``model.ntxent_chunked``, one kernel each, flash-attention style (a
program takes a block of rows and loops over column blocks; the scores tile lives in registers only). The
columns are split across programs too, so every launch has at least 2 programs per SM (``launch_grid``, a pure
function of the sizes, testable without a GPU), and the splits' partial sums are merged in a fixed order:
deterministic, no float atomics, resumed runs bit-identical. 16-bit inputs feed the tensor cores with float32
accumulation; float32 inputs multiply exactly unless ``float32_matmul_precision="tf32"``. It also runs on CPU
tensors under ``TRITON_INTERPRET=1`` (small ``INTERPRETER_TILES``; two interpreter differences bridged). Each
kernel, the precision rules and the interpreter's differences: docs/design.md (*The Triton backend*).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch
import triton
import triton.language as tl

from .ntxent_common import FLOAT32_MATMUL_PRECISIONS, NORM_EPS

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.0 / math.log(2.0)
PROGRAMS_PER_SM = (
    2  # at least this many programs per SM in every launch (latency hiding, tail effects)
)
INTERPRETER_SM_COUNT = (
    4  # what launch_grid is told under the interpreter: small problems split their columns too
)
INTERPRETER_BLOCK, INTERPRETER_BLOCK_K = (
    16,
    32,
)  # tile sizes under the interpreter (read at each call)
_FP16_WEIGHT_SCALE = 2.0**14  # weights <= 2, so scaled weights stay below float16's 65504


@triton.jit
def _round_to_nearest(x, DROP_BITS: tl.constexpr):
    """float32 x rounded to nearest at 24 - DROP_BITS significant bits (Veltkamp's split), still float32. The
    interpreter's float32 -> 16-bit conversion truncates where the GPU's rounds to nearest: rounding first
    makes the conversion exact, so interpreted runs see the GPU's 16-bit values (bfloat16: 16, float16: 13)."""
    c = x * (2.0**DROP_BITS + 1.0)
    return c - (c - x)


@triton.jit
def _scores(
    q,
    rows_ptr,
    cols_ptr,
    offs_m,
    offs_n,
    row_ok,
    col_ok,
    D,
    stride_r,
    stride_c,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) dot products of a row block with a column block, accumulated in ACC. With
    ONE_K, ``q`` is the row tile already loaded (d <= BLOCK_K); otherwise d is walked in BLOCK_K chunks."""
    offs_k = tl.arange(0, BLOCK_K)
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    if ONE_K:
        k = tl.load(
            cols_ptr + offs_n.to(tl.int64)[:, None] * stride_c + offs_k[None, :],
            mask=col_ok[:, None] & (offs_k[None, :] < D),
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), s, input_precision=PRECISION)
    else:
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(
                rows_ptr + offs_m.to(tl.int64)[:, None] * stride_r + kk[None, :],
                mask=row_ok[:, None] & (kk[None, :] < D),
                other=0.0,
            )
            b = tl.load(
                cols_ptr + offs_n.to(tl.int64)[:, None] * stride_c + kk[None, :],
                mask=col_ok[:, None] & (kk[None, :] < D),
                other=0.0,
            )
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            s = tl.dot(a, tl.trans(b), s, input_precision=PRECISION)
    return s


@triton.jit
def _load_rows(rows_ptr, offs_m, row_ok, D, stride_r, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    q = tl.load(
        rows_ptr + offs_m.to(tl.int64)[:, None] * stride_r + offs_k[None, :],
        mask=row_ok[:, None] & (offs_k[None, :] < D),
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _special_columns(row_ok, pos, row_offset, BLOCK_M: tl.constexpr):
    """(own_lo, own_hi, pos_lo, pos_hi): the column ranges holding this row block's own columns and its
    positives (a superset for arbitrary positives). Only the column tiles that meet them, and the last
    tile of a split, need the per-element mask, which otherwise costs ~4 integer compares and selects per
    pair: more issue slots than the exp (16/clock/SM) it would sit beside."""
    own_lo = row_offset + tl.program_id(0) * BLOCK_M
    pos_lo = tl.min(tl.where(row_ok, pos, 2**62), axis=0)
    pos_hi = tl.max(tl.where(row_ok, pos, -1), axis=0) + 1
    return own_lo, own_lo + BLOCK_M, pos_lo, pos_hi


@triton.jit
def _needs_mask(n0, stop, own_lo, own_hi, pos_lo, pos_hi, BLOCK_N: tl.constexpr):
    n1 = n0 + BLOCK_N
    return (n1 > stop) | ((n0 < own_hi) & (n1 > own_lo)) | ((n0 < pos_hi) & (n1 > pos_lo))


@triton.jit
def _row_negatives_kernel(
    rows_ptr,
    cols_ptr,
    pos_ptr,
    out_ptr,
    consts_ptr,
    m,
    M,
    D,
    row_offset,
    split_columns,
    stride_r,
    stride_c,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """Program (row block, column split): partial negative sums of its rows over its columns -> out[split, rows]."""
    scale_log2 = tl.load(consts_ptr + 1)  # log2(e)/tau, in ACC (a float64 run keeps it exact)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    row_ok = offs_m < m
    own = row_offset + offs_m  # each row's own column (the diagonal)
    pos = tl.load(pos_ptr + offs_m, mask=row_ok, other=-1)
    q = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    if ONE_K:
        q = _load_rows(rows_ptr, offs_m, row_ok, D, stride_r, BLOCK_K, UPCAST)
    own_lo, own_hi, pos_lo, pos_hi = _special_columns(row_ok, pos, row_offset, BLOCK_M)
    total = tl.zeros([BLOCK_M], dtype=ACC)
    start = split * split_columns  # splits are whole column tiles (launch_grid)
    stop = tl.minimum(start + split_columns, M)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < stop
        # `duplicates` pair kept: the same _scores call as _row_grad_kernel's (the shared @triton.jit helper); its
        # tiles are separate constexpr arguments (no struct passes them as one), so both kernels repeat the list.
        s = _scores(
            q,
            rows_ptr,
            cols_ptr,
            offs_m,
            offs_n,
            row_ok,
            col_ok,
            D,
            stride_r,
            stride_c,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            ONE_K,
            UPCAST,
            PRECISION,
            ACC,
        )
        # exp(s/tau - 1/tau) = 2^(s * log2(e)/tau - log2(e)/tau) <= 1 (one FMA and one ex2 a pair)
        e = tl.exp2(s * scale_log2 - scale_log2)
        if _needs_mask(n0, stop, own_lo, own_hi, pos_lo, pos_hi, BLOCK_N):
            # the diagonal, the positive and padding masked by index (a large negative logit would not do in bf16)
            keep = (
                col_ok[None, :]
                & (offs_n[None, :] != own[:, None])
                & (offs_n[None, :].to(tl.int64) != pos[:, None])
            )
            e = tl.where(keep, e, 0.0)
        total += tl.sum(e, axis=1)
    tl.store(out_ptr + split.to(tl.int64) * m + offs_m, total, mask=row_ok)


@triton.jit
def _row_grad_kernel(
    rows_ptr,
    cols_ptr,
    scale_rows_ptr,
    scale_cols_ptr,
    pos_ptr,
    out_ptr,
    consts_ptr,
    m,
    M,
    D,
    row_offset,
    split_columns,
    stride_r,
    stride_c,
    stride_split,
    stride_o,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_K: tl.constexpr,
    SHARE: tl.constexpr,
    UPCAST: tl.constexpr,
    W_LOW: tl.constexpr,
    W_SCALE: tl.constexpr,
    DROP_BITS: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """Program (row block, d slice, column split): partial sums of E (scale_k + scale_j) c_j
    -> out[split, rows, d slice]."""
    scale_log2 = tl.load(consts_ptr + 1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    row_ok = offs_m < m
    own = row_offset + offs_m
    pos = tl.load(pos_ptr + offs_m, mask=row_ok, other=-1)
    # p_kj = E_kj a_k and p_jk = E_kj b_j with E = exp(s/tau - 1/tau); padding rows and columns get 0.
    a = tl.load(scale_rows_ptr + offs_m, mask=row_ok, other=0.0)
    q = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    if ONE_K:
        q = _load_rows(rows_ptr, offs_m, row_ok, D, stride_r, BLOCK_K, UPCAST)
    own_lo, own_hi, pos_lo, pos_hi = _special_columns(row_ok, pos, row_offset, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    start = split * split_columns
    stop = tl.minimum(start + split_columns, M)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < stop
        col_base = cols_ptr + offs_n.to(tl.int64)[:, None] * stride_c
        if SHARE:
            # d fits one tile and one program covers it: the column tile serves both products.
            v = tl.load(
                col_base + offs_d[None, :], mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0
            )
            if UPCAST:
                s = tl.dot(q, tl.trans(v.to(tl.float32)), input_precision=PRECISION)
            else:
                s = tl.dot(q, tl.trans(v), input_precision=PRECISION)
        else:
            # `duplicates` pair kept: the same _scores call as _row_negatives_kernel's. A @triton.jit helper takes its
            # tiles as separate constexpr arguments (no struct passes them as one), so the two kernels repeat the list.
            s = _scores(
                q,
                rows_ptr,
                cols_ptr,
                offs_m,
                offs_n,
                row_ok,
                col_ok,
                D,
                stride_r,
                stride_c,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                ONE_K,
                UPCAST,
                PRECISION,
                ACC,
            )
            v = tl.load(
                col_base + offs_d[None, :], mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0
            )
        e = tl.exp2(s * scale_log2 - scale_log2)
        b = tl.load(scale_cols_ptr + offs_n, mask=col_ok, other=0.0)
        w = e * (a[:, None] + b[None, :])
        if _needs_mask(n0, stop, own_lo, own_hi, pos_lo, pos_hi, BLOCK_N):
            keep = (
                col_ok[None, :]
                & (offs_n[None, :] != own[:, None])
                & (offs_n[None, :].to(tl.int64) != pos[:, None])
            )
            w = tl.where(keep, w, 0.0)
        if W_LOW:
            # 16-bit weights for the tensor-core product (float16: scaled into its normal range first).
            if W_SCALE != 1.0:
                w = w * W_SCALE
            if UPCAST:  # the interpreter: the GPU's rounding to 16 bits, kept in float32 (see _round_to_nearest)
                w = _round_to_nearest(w, DROP_BITS)
                v = v.to(tl.float32)
            else:
                w = w.to(v.dtype)
        else:
            v = v.to(ACC)
        acc = tl.dot(w, v, acc, input_precision=PRECISION)
    if W_SCALE != 1.0:
        acc = acc * (1.0 / W_SCALE)
    out = (
        out_ptr
        + split.to(tl.int64) * stride_split
        + offs_m.to(tl.int64)[:, None] * stride_o
        + offs_d[None, :]
    )
    tl.store(out, acc, mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _normalize_kernel(
    z1_ptr,
    z2_ptr,
    rows_ptr,
    operands_ptr,
    norms_ptr,
    eps_ptr,
    n,
    D,
    stride_1,
    stride_2,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    OPERANDS: tl.constexpr,
    DROP_BITS: tl.constexpr,
    ACC: tl.constexpr,
):
    """rows = [z1; z2] / max(||.||, eps) in ACC (IEEE sqrt and division, as F.normalize), their copy in the
    inputs' dtype for the products (OPERANDS: 16-bit inputs), and the norms."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < 2 * n
    first = offs_m < n
    d_ok = offs_d[None, :] < D
    x1 = tl.load(
        z1_ptr + offs_m.to(tl.int64)[:, None] * stride_1 + offs_d[None, :],
        mask=(row_ok & first)[:, None] & d_ok,
        other=0.0,
    )
    x2 = tl.load(
        z2_ptr + (offs_m - n).to(tl.int64)[:, None] * stride_2 + offs_d[None, :],
        mask=(row_ok & ~first)[:, None] & d_ok,
        other=0.0,
    )
    x = tl.where(first[:, None], x1, x2)
    low = x  # the inputs' dtype
    x = x.to(ACC)
    eps = tl.load(eps_ptr)
    # The squares are taken of the row divided by the power of two of its largest entry (exact: the norm is
    # bit-identical to the plain one wherever that is finite and nonzero, as model.ntxent_common.row_norms): norms
    # from 1e-30 to 1e30 would under/overflow in float32 squares. The power is clamped to [2^-126, 2^126]
    # (float64: 2^-1022, 2^1022) so that its reciprocal is a normal number.
    largest = tl.max(tl.abs(x), axis=1)
    if (
        ACC == tl.float32
    ):  # IEEE-rounded sqrt and division (Triton's plain float32 ones are approximate)
        power_bits = tl.minimum(
            tl.maximum(largest.to(tl.int32, bitcast=True) & 0x7F800000, 0x00800000), 0x7E800000
        )
        power = power_bits.to(tl.float32, bitcast=True)
        scaled = x * tl.div_rn(1.0, power)[:, None]
        norm = tl.sqrt_rn(tl.sum(scaled * scaled, axis=1)) * power
        # where(norm < eps, ...) rather than maximum: a NaN norm stays NaN (the row's NaN/inf propagates)
        divisor = tl.where(norm < eps, eps, norm)
        rows = tl.div_rn(x, tl.broadcast_to(divisor[:, None], (BLOCK_M, BLOCK_D)))
    else:  # float64 sqrt and division are IEEE-rounded
        power_bits = largest.to(tl.int64, bitcast=True) & 0x7FF0000000000000
        power_bits = tl.minimum(tl.maximum(power_bits, 0x0010000000000000), 0x7FD0000000000000)
        power = power_bits.to(tl.float64, bitcast=True)
        scaled = x * (1.0 / power)[:, None]
        norm = tl.sqrt(tl.sum(scaled * scaled, axis=1)) * power
        rows = x / tl.where(norm < eps, eps, norm)[:, None]
    offsets = offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(rows_ptr + offsets, rows, mask=row_ok[:, None] & d_ok)
    if OPERANDS:
        operands = rows
        if DROP_BITS > 0:  # the interpreter: round as the GPU does before its truncating conversion
            operands = _round_to_nearest(rows, DROP_BITS)
        tl.store(operands_ptr + offsets, operands.to(low.dtype), mask=row_ok[:, None] & d_ok)
    tl.store(norms_ptr + offs_m, norm, mask=row_ok)


@triton.jit
def _log1p(r):
    """log(1 + r), r >= 0, to a few ulps: 2 atanh(w) with w = r / (2 + r) as an odd series for r <= 1/4
    (|w| <= 1/9: 9 terms reach float64's precision), where log(1 + r) would keep only the absolute accuracy
    of log near 1 (the saturated regime has r ~ 1e-5); log(1 + r) above."""
    w = r / (2.0 + r)
    w2 = w * w
    tail = 1.0 / 15.0 + w2 * (1.0 / 17.0)
    tail = 1.0 / 11.0 + w2 * (1.0 / 13.0 + w2 * tail)
    tail = 1.0 / 7.0 + w2 * (1.0 / 9.0 + w2 * tail)
    series = 2.0 * w * (1.0 + w2 * (1.0 / 3.0 + w2 * (1.0 / 5.0 + w2 * tail)))
    return tl.where(r <= 0.25, series, tl.log(1.0 + r))


@triton.jit
def _positive_stats_kernel(
    partials_ptr,
    rows_ptr,
    norms_ptr,
    eps_ptr,
    loss_ptr,
    not_positive_ptr,
    scale_ptr,
    consts_ptr,
    m,
    half,
    D,
    splits,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per row k: neg_k = the column splits' partial sums added in split order; t_k = -(||z_k - z_pos||^2 +
    deficit_k + deficit_pos) / (2 tau) with deficit = 1 - ||z||^2 from the norms (0 for unit rows: see
    model.ntxent_chunked.norm_deficit); r = neg e^{-t}; loss_k = log1p(r), q_k = r / (1 + r),
    scale_k = e^{-t} / (1 + r)."""
    inv_temp = tl.load(consts_ptr)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < m
    negatives = tl.load(partials_ptr + offs_m, mask=row_ok, other=0.0)
    for split in range(1, splits):
        negatives += tl.load(partials_ptr + split * m + offs_m, mask=row_ok, other=0.0)
    partner = (offs_m + half) % m
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    z = tl.load(rows_ptr + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    z_pos = tl.load(
        rows_ptr + partner.to(tl.int64)[:, None] * D + offs_d[None, :], mask=mask, other=0.0
    )
    diff = z - z_pos
    eps = tl.load(eps_ptr)
    norm = tl.load(norms_ptr + offs_m, mask=row_ok, other=1.0)
    norm_pos = tl.load(norms_ptr + partner, mask=row_ok, other=1.0)
    ratio, ratio_pos = (
        tl.minimum(norm, eps) / eps,
        tl.minimum(norm_pos, eps) / eps,
    )  # no overflow for huge norms
    deficit = tl.where(norm > eps, 0.0, 1.0 - ratio * ratio) + tl.where(
        norm_pos > eps, 0.0, 1.0 - ratio_pos * ratio_pos
    )
    exp_minus_t = tl.exp(0.5 * inv_temp * (tl.sum(diff * diff, axis=1) + deficit))
    ratio = negatives * exp_minus_t
    tl.store(loss_ptr + offs_m, _log1p(ratio), mask=row_ok)
    tl.store(not_positive_ptr + offs_m, ratio / (1.0 + ratio), mask=row_ok)
    tl.store(scale_ptr + offs_m, exp_minus_t / (1.0 + ratio), mask=row_ok)


@triton.jit
def _input_grad_kernel(
    partials_ptr,
    rows_ptr,
    not_positive_ptr,
    norms_ptr,
    grad_scale_ptr,
    out_ptr,
    m,
    half,
    D,
    splits,
    stride_split,
    eps_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DROP_BITS: tl.constexpr,
):
    """Per row k: g = (sum of the splits' partials, in split order) - (q_k + q_pos) z_pos, times grad_scale;
    then the normalisation's backward (g - z <z, g>) / ||x|| (just g / eps where the norm was clamped)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < m
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    offsets = offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
    grad = tl.load(partials_ptr + offsets, mask=mask, other=0.0)
    for split in range(1, splits):
        grad += tl.load(partials_ptr + split * stride_split + offsets, mask=mask, other=0.0)
    partner = (offs_m + half) % m
    weight = tl.load(not_positive_ptr + offs_m, mask=row_ok, other=0.0)
    weight += tl.load(not_positive_ptr + partner, mask=row_ok, other=0.0)
    z_pos = tl.load(
        rows_ptr + partner.to(tl.int64)[:, None] * D + offs_d[None, :], mask=mask, other=0.0
    )
    grad = (grad - weight[:, None] * z_pos) * tl.load(grad_scale_ptr)
    z = tl.load(rows_ptr + offsets, mask=mask, other=0.0)
    norm = tl.load(norms_ptr + offs_m, mask=row_ok, other=1.0)
    eps = tl.load(eps_ptr)
    projected = tl.where((norm > eps)[:, None], grad - z * tl.sum(z * grad, axis=1)[:, None], grad)
    grad_x = projected / tl.maximum(norm, eps)[:, None]
    if DROP_BITS > 0:  # the interpreter: round as the GPU does before its truncating conversion
        grad_x = _round_to_nearest(grad_x, DROP_BITS)
    tl.store(out_ptr + offsets, grad_x.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- tiles and grid


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """Tiles and grid of one kernel launch. ``grid``: (row blocks, column splits) for row_negatives,
    (row blocks, d slices, column splits) for row_grad; each split covers ``split_columns`` columns (a
    whole number of BLOCK_N tiles; the last split may be shorter)."""

    grid: tuple[int, ...]
    block_m: int
    block_n: int
    block_k: int
    block_d: int  # row_grad's output slice width (row_negatives: 0)
    column_splits: int
    split_columns: int
    num_warps: int
    num_stages: int

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    negatives: KernelLaunch
    grad: KernelLaunch


def _cuda_tiles(d: int, dtype: torch.dtype, precision: str) -> dict:
    """Preferred tiles on an H100. Compiled for sm_90a at every production size (tests/test_triton_sm90.py,
    bench/results/triton_sm90.json; Triton 3.8 and 3.6): no register spill but 32 bytes in the float32
    "ieee" gradient kernel on Triton 3.8 (none on 3.6), at most 144 KiB of shared memory a block (TF32
    row_negatives), 1-6 CTAs per SM in the two product kernels. 16-bit inputs (and TF32): BLOCK_M >= 64
    (one wgmma is 64 rows), d <= 128 in one K tile (the row tile stays in registers, the column tile
    serves both products), larger d walked in 64-wide chunks with the gradient's output split in
    128-wide slices. Float32 "ieee" (FMA units) walks d in 32-wide chunks with 64-wide output slices;
    float64 likewise with 16/32-wide tiles. ``min_m``/``min_n``: how far launch_grid may shrink a tile
    when the problem has too few tiles to fill the GPU."""
    tensor_cores = dtype in (torch.bfloat16, torch.float16) or (
        dtype == torch.float32 and precision == "tf32"
    )
    if dtype == torch.float64:
        k, block_d = (max(16, _pow2(d)) if d <= 16 else 16), (max(16, _pow2(d)) if d <= 32 else 32)
        negatives = dict(
            block_m=32, block_n=32, block_k=k, num_warps=4, num_stages=2, min_m=16, min_n=16
        )
        grad = dict(negatives, block_d=block_d)
    elif not tensor_cores:  # float32, "ieee"
        k, block_d = (max(16, _pow2(d)) if d <= 32 else 32), (max(16, _pow2(d)) if d <= 64 else 64)
        negatives = dict(
            block_m=64, block_n=64, block_k=k, num_warps=8, num_stages=2, min_m=32, min_n=32
        )
        grad = dict(negatives, block_d=block_d)
    else:
        one_k = d <= (128 if dtype != torch.float32 else 64)  # TF32 tiles take twice the registers
        k = max(16, _pow2(d)) if one_k else 64
        block_d = max(16, _pow2(d)) if d <= 128 else 128
        negatives = dict(
            block_m=128, block_n=64, block_k=k, num_warps=8, num_stages=3, min_m=64, min_n=32
        )
        grad = dict(
            block_m=64,
            block_n=64,
            block_k=k,
            block_d=block_d,
            num_warps=8,
            num_stages=3,
            min_m=64,
            min_n=32,
        )
    return {"negatives": negatives, "grad": grad}


def _interpreter_tiles(d: int, dtype: torch.dtype, precision: str) -> dict:
    """Small tiles (``INTERPRETER_BLOCK``): tests cover several row/column/K/d tiles and column splits
    with few rows. The interpreter's time goes per operation, not per element: larger problems run
    faster with larger tiles, which a test may set."""
    k = INTERPRETER_BLOCK_K if d <= 128 else 256
    tiles = dict(
        block_m=INTERPRETER_BLOCK,
        block_n=INTERPRETER_BLOCK,
        block_k=k,
        num_warps=1,
        num_stages=1,
        min_m=INTERPRETER_BLOCK,
        min_n=INTERPRETER_BLOCK,
    )
    return {"negatives": tiles, "grad": dict(tiles, block_d=k)}


CUDA_TILES = _cuda_tiles
INTERPRETER_TILES = _interpreter_tiles


def _balanced_split(column_tiles: int, wanted: int) -> int:
    """Tiles per column split: ``wanted`` splits as even as whole tiles allow (cdiv, e.g. 26/26/26/26/24 of 128
    tiles, not 31/31/31/31/4). Where the even width gives fewer than ``wanted`` splits (only when
    column_tiles < wanted * (wanted - 1)), the widest that still gives ``wanted``: (C - 1) // (S - 1). Either
    way no split is wider than cdiv(column_tiles, splits), the width of an even division into that many."""
    tiles_per_split = triton.cdiv(column_tiles, wanted)
    if triton.cdiv(column_tiles, tiles_per_split) < wanted:
        tiles_per_split = max(1, (column_tiles - 1) // (wanted - 1))
    return tiles_per_split


PROGRAM_OVERHEAD_TILES = (
    0.5  # a program's fixed cost (row loads, the partial sums' store) in column tiles' work
)
WAVE_GAIN = 0.05  # more splits only where they end the launch at least this much sooner (each costs a merge)


def _whole_wave_split(column_tiles: int, blocks: int, slots: int, least: int) -> int:
    """Tiles per column split for ``blocks`` programs per split (row blocks x d slices) on ``slots`` resident
        programs (SMs x programs per SM): of the even widths (``_balanced_split``'s) giving at least ``least``
        splits, the one that ends the launch soonest, counting whole waves: ceil(programs / slots) x (tiles per
        split + ``PROGRAM_OVERHEAD_TILES``); more splits only where they gain ``WAVE_GAIN`` (each split's partial sums
    are merged after). At 2N = 8,192
        in bf16 on an H100 (64 row blocks, 128 column tiles, 264 slots): 8 splits of 16 tiles, 512 programs in 2
        waves, not 5 of 26 (320 programs: 1.21 waves, the second nearly empty but as long as the first)."""
    first = _balanced_split(column_tiles, least)
    best, best_time = first, None
    for tiles_per_split in range(first, 0, -1):
        splits = triton.cdiv(column_tiles, tiles_per_split)
        if triton.cdiv(column_tiles, splits) != tiles_per_split and tiles_per_split != first:
            continue  # not an even width: a narrower one gives the same splits
        time = triton.cdiv(blocks * splits, slots) * (tiles_per_split + PROGRAM_OVERHEAD_TILES)
        if best_time is None or time < (1 - WAVE_GAIN) * best_time:
            best, best_time = tiles_per_split, time
    return best


def _plan_kernel(
    rows: int,
    columns: int,
    d_slices_of,
    tiles: dict,
    target: int,
    column_splits: int | None,
    grad: bool,
) -> KernelLaunch:
    block_m, block_n = tiles["block_m"], tiles["block_n"]
    block_d = tiles.get("block_d", 0)
    d_slices = d_slices_of(block_d) if grad else 1
    # Too few tiles to reach the target even with one column tile per split: shrink BLOCK_N, then BLOCK_M.
    while (
        column_splits is None
        and triton.cdiv(rows, block_m) * triton.cdiv(columns, block_n) * d_slices < target
    ):
        if block_n > tiles["min_n"]:
            block_n //= 2
        elif block_m > tiles["min_m"]:
            block_m //= 2
        else:
            break
    row_blocks = max(1, triton.cdiv(rows, block_m))
    column_tiles = max(1, triton.cdiv(columns, block_n))
    wanted = column_splits or triton.cdiv(target, row_blocks * d_slices)
    wanted = max(1, min(wanted, column_tiles))
    if column_splits:
        tiles_per_split = _balanced_split(column_tiles, wanted)
    else:  # whole waves of the device's resident programs
        tiles_per_split = _whole_wave_split(column_tiles, row_blocks * d_slices, target, wanted)
    splits = triton.cdiv(column_tiles, tiles_per_split)
    small = block_m * block_n <= 64 * 32  # small tiles need fewer warps
    num_warps = min(tiles["num_warps"], 4) if small else tiles["num_warps"]
    grid = (row_blocks, d_slices, splits) if grad else (row_blocks, splits)
    return KernelLaunch(
        grid=grid,
        block_m=block_m,
        block_n=block_n,
        block_k=tiles["block_k"],
        block_d=block_d,
        column_splits=splits,
        split_columns=tiles_per_split * block_n,
        num_warps=num_warps,
        num_stages=tiles["num_stages"],
    )


def launch_grid(
    rows: int,
    columns: int,
    d: int,
    dtype: torch.dtype,
    sm_count: int,
    *,
    float32_matmul_precision: str = "ieee",
    tiles=CUDA_TILES,
    programs_per_sm: int = PROGRAMS_PER_SM,
    column_splits: int | None = None,
) -> LaunchPlan:
    """Tiles and grids of both kernels for ``rows`` anchors against ``columns`` columns of width ``d``.

    Pure (no CUDA needed): ``tiles`` is the tile table (``CUDA_TILES`` by default, whatever the machine).
    The columns are split across programs until each launch has at least ``programs_per_sm * sm_count``
    programs (when the problem has that many tiles; tiles shrink to their minimum first if it has not).
    ``column_splits`` forces a number of splits instead (tests)."""
    if rows < 0 or columns < 1 or d < 1 or sm_count < 1:
        raise ValueError(
            f"launch_grid needs rows >= 0, columns >= 1, d >= 1, sm_count >= 1; got {rows}, {columns}, {d}, {sm_count}"
        )
    table = tiles(d, dtype, float32_matmul_precision)
    target = programs_per_sm * sm_count
    d_slices_of = lambda block_d: triton.cdiv(d, block_d)  # noqa: E731
    return LaunchPlan(
        negatives=_plan_kernel(
            rows, columns, d_slices_of, table["negatives"], target, column_splits, grad=False
        ),
        grad=_plan_kernel(
            rows, columns, d_slices_of, table["grad"], target, column_splits, grad=True
        ),
    )


# --------------------------------------------------------------------------- launch

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _launch(kernel, grid, *args, **kwargs):
    """Every launch goes through here (tests compile the launches for sm_90 without a GPU by replacing it)."""
    kernel[grid](*args, **kwargs)


def _require_cuda(*tensors: torch.Tensor):
    if not _INTERPRET and not all(t.is_cuda for t in tensors):
        raise ValueError(
            "the Triton NT-Xent backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)"
        )


def _check(rows: torch.Tensor, columns: torch.Tensor, row_offset: int, precision: str):
    if rows.ndim != 2 or columns.ndim != 2 or rows.shape[1] != columns.shape[1]:
        raise ValueError(
            f"rows (m, d) and columns (M, d) expected, got {tuple(rows.shape)} and {tuple(columns.shape)}"
        )
    if rows.dtype != columns.dtype or rows.dtype not in _DTYPES:
        raise TypeError(
            f"rows and columns must share a float32/bfloat16/float16/float64 dtype, got {rows.dtype}, {columns.dtype}"
        )
    if not 0 <= row_offset <= columns.shape[0] - rows.shape[0]:
        raise ValueError(
            f"row_offset {row_offset} out of range for {rows.shape[0]} rows in {columns.shape[0]} columns"
        )
    _require_cuda(rows, columns)
    if rows.device != columns.device:
        raise ValueError(f"rows on {rows.device}, columns on {columns.device}")
    if precision not in FLOAT32_MATMUL_PRECISIONS:
        raise ValueError(
            f"float32_matmul_precision must be one of {FLOAT32_MATMUL_PRECISIONS}, got {precision!r}"
        )


def _accumulation(dtype: torch.dtype) -> tuple[torch.dtype, object]:
    """(torch dtype, Triton dtype) of the statistics: float64 for float64 inputs, float32 otherwise
    (as ``model.ntxent_common.accumulation_dtype``)."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _precisions(dtype: torch.dtype, precision: str) -> tuple[bool, bool, float, str]:
    """(UPCAST, W_LOW, W_SCALE, PRECISION) for an input dtype and the float32 matmul precision."""
    if dtype == torch.float32:
        return False, False, 1.0, precision
    if dtype == torch.float64:
        return False, False, 1.0, "ieee"
    upcast = (
        _INTERPRET  # see the module docstring: the interpreter's tl.dot cannot take 16-bit tiles
    )
    # 16-bit operands ignore input_precision on the GPU; the interpreter's widened float32 tiles multiply exactly
    return (
        upcast,
        True,
        (_FP16_WEIGHT_SCALE if dtype == torch.float16 else 1.0),
        ("ieee" if upcast else "tf32"),
    )


def _drop_bits(dtype: torch.dtype) -> int:
    """float32 significand bits that a conversion to ``dtype`` drops (24 - its significant bits)."""
    return {torch.bfloat16: 16, torch.float16: 13}.get(dtype, 0)


@functools.lru_cache(maxsize=8)
def _cuda_sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return INTERPRETER_SM_COUNT if _INTERPRET else _cuda_sm_count(device)


def _plan(
    rows: torch.Tensor, columns: torch.Tensor, precision: str, column_splits: int | None
) -> LaunchPlan:
    return launch_grid(
        rows.shape[0],
        columns.shape[0],
        rows.shape[1],
        rows.dtype,
        _sm_count(rows.device),
        float32_matmul_precision=precision,
        tiles=INTERPRETER_TILES if _INTERPRET else CUDA_TILES,
        column_splits=column_splits,
    )


@functools.lru_cache(maxsize=8)
def _eps(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """NORM_EPS as a (cached) device tensor: exact in float64, where a scalar argument would be float32."""
    return torch.full((1,), NORM_EPS, dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _consts(inv_temp: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1/tau, log2(e)/tau] as a (cached, read-only) device tensor of the accumulation dtype: Triton
    would round scalar float arguments to float32, which a float64 run must not do."""
    consts = torch.empty(2, dtype=dtype, device=device)
    consts[0], consts[1] = inv_temp, inv_temp * _LOG2E  # device fills, no host-to-device copy
    return consts


def _row_block(d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D) of the per-row kernels: whole rows (d <= 2048 in registers), 4096 float32 (2048
    float64) elements a program of 4 warps: 32 a thread and a tensor, no spills."""
    block_d = max(16, _pow2(d))
    return max(1, min(64, (2048 if dtype == torch.float64 else 4096) // block_d)), block_d


def normalize(z1: torch.Tensor, z2: torch.Tensor, operand_dtype: torch.dtype):
    """(rows, operands, norms) of the projections z1, z2 (N, d): rows = [z1; z2] / max(||.||, eps), (2N, d) in
    the accumulation dtype; operands = rows rounded to ``operand_dtype`` for the products (the rows themselves
    for float32/float64); norms (2N,). One kernel."""
    if z1.shape != z2.shape or z1.dtype != z2.dtype or z1.dtype not in _DTYPES:
        raise ValueError(
            f"z1, z2: (N, d) of one float dtype expected, got {tuple(z1.shape)} {z1.dtype}, "
            f"{tuple(z2.shape)} {z2.dtype}"
        )
    _require_cuda(z1, z2)
    z1, z2 = (z if z.stride(-1) == 1 else z.contiguous() for z in (z1, z2))
    n, d = z1.shape
    acc_dtype, acc_tl = _accumulation(z1.dtype)
    rows = torch.empty((2 * n, d), dtype=acc_dtype, device=z1.device)
    norms = torch.empty(2 * n, dtype=acc_dtype, device=z1.device)
    low = operand_dtype in (torch.bfloat16, torch.float16)
    operands = torch.empty((2 * n, d), dtype=operand_dtype, device=z1.device) if low else rows
    if n > 0 and d > 0:
        block_m, block_d = _row_block(d, acc_dtype)
        _launch(
            _normalize_kernel,
            (triton.cdiv(2 * n, block_m),),
            z1,
            z2,
            rows,
            operands,
            norms,
            _eps(acc_dtype, z1.device),
            n,
            d,
            z1.stride(0),
            z2.stride(0),
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            OPERANDS=low,
            DROP_BITS=_drop_bits(operand_dtype) if _INTERPRET else 0,
            ACC=acc_tl,
            num_warps=4,
        )
    return rows, operands, norms


def positive_stats(
    partials: torch.Tensor, rows: torch.Tensor, norms: torch.Tensor, inv_temp: float
):
    """(loss_rows, not_positive, scale), each (m,), from the negatives' partial sums (splits, m), the rows
    (m, d) and the inputs' norms (m,) as ``normalize`` returns them, m = 2N local rows whose positive is row
    (k + N) mod m: see ``model.ntxent_chunked``."""
    m, d = rows.shape
    if (
        partials.ndim != 2
        or partials.shape[1] != m
        or not rows.is_contiguous()
        or not partials.is_contiguous()
    ):
        raise ValueError(
            f"contiguous partials (splits, {m}) and rows ({m}, d) expected, got {tuple(partials.shape)}"
        )
    if norms.shape != (m,) or norms.dtype != rows.dtype:
        raise ValueError(
            f"norms ({m},) of {rows.dtype} expected, got {tuple(norms.shape)} {norms.dtype}"
        )
    loss_rows, not_positive, scale = (
        torch.empty(m, dtype=rows.dtype, device=rows.device) for _ in range(3)
    )
    if m > 0:
        block_m, block_d = _row_block(d, rows.dtype)
        _launch(
            _positive_stats_kernel,
            (triton.cdiv(m, block_m),),
            partials,
            rows,
            norms.contiguous(),
            _eps(rows.dtype, rows.device),
            loss_rows,
            not_positive,
            scale,
            _consts(float(inv_temp), rows.dtype, rows.device),
            m,
            m // 2,
            d,
            partials.shape[0],
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return loss_rows, not_positive, scale


def input_grad(
    partials: torch.Tensor,
    rows: torch.Tensor,
    not_positive: torch.Tensor,
    norms: torch.Tensor,
    grad_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(m, d) in ``out_dtype``: the gradient with respect to the un-normalised inputs, from the gradient's
    partial sums (splits, m, d): see ``model.ntxent_chunked.input_grad``."""
    m, d = rows.shape
    if (
        partials.ndim != 3
        or partials.shape[1:] != (m, d)
        or not partials.is_contiguous()
        or not rows.is_contiguous()
    ):
        raise ValueError(
            f"contiguous partials (splits, {m}, {d}) and rows ({m}, {d}) expected, got {tuple(partials.shape)}"
        )
    out = torch.empty((m, d), dtype=out_dtype, device=rows.device)
    if m > 0 and d > 0:
        block_m, block_d = _row_block(d, rows.dtype)
        _launch(
            _input_grad_kernel,
            (triton.cdiv(m, block_m),),
            partials,
            rows,
            not_positive,
            norms,
            grad_scale.to(rows.dtype).reshape(1),
            out,
            m,
            m // 2,
            d,
            partials.shape[0],
            partials.stride(0),
            _eps(rows.dtype, rows.device),
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            DROP_BITS=_drop_bits(out_dtype) if _INTERPRET else 0,
            num_warps=4,
        )
    return out


def row_negatives(
    rows: torch.Tensor,
    columns: torch.Tensor,
    positives: torch.Tensor,
    row_offset: int,
    inv_temp: float,
    float32_matmul_precision: str = "ieee",
    column_splits: int | None = None,
) -> torch.Tensor:
    """(splits, m) partial sums in the accumulation dtype (float32; float64 for float64 inputs), to be added in
    split order: per row k of ``rows`` (m, d), the sum over columns j of ``columns`` (M, d) other than
    row_offset + k and positives[k] of exp(inv_temp * (<rows_k, columns_j> - 1)). ``rows`` must be
    columns[row_offset:row_offset + m] in value for the result to be the loss's (not checked)."""
    _check(rows, columns, row_offset, float32_matmul_precision)
    rows, columns = rows.contiguous(), columns.contiguous()
    m, d = rows.shape
    M = columns.shape[0]
    if positives.shape != (m,):
        raise ValueError(f"positives ({m},) expected, got {tuple(positives.shape)}")
    positives = positives.to(device=rows.device, dtype=torch.int64).contiguous()
    acc_dtype, acc_tl = _accumulation(rows.dtype)
    if m == 0:
        return torch.zeros((1, 0), dtype=acc_dtype, device=rows.device)
    launch = _plan(rows, columns, float32_matmul_precision, column_splits).negatives
    upcast, _, _, precision = _precisions(rows.dtype, float32_matmul_precision)
    partial = torch.empty((launch.column_splits, m), dtype=acc_dtype, device=rows.device)
    _launch(
        _row_negatives_kernel,
        launch.grid,
        rows,
        columns,
        positives,
        partial,
        _consts(float(inv_temp), acc_dtype, rows.device),
        m,
        M,
        d,
        int(row_offset),
        launch.split_columns,
        rows.stride(0),
        columns.stride(0),
        BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n,
        BLOCK_K=launch.block_k,
        ONE_K=d <= launch.block_k,
        UPCAST=upcast,
        PRECISION=precision,
        ACC=acc_tl,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    return partial  # merged in split order by positive_stats (no atomics: bit-identical from run to run)


def row_grad(
    rows: torch.Tensor,
    columns: torch.Tensor,
    scale_rows: torch.Tensor,
    scale_columns: torch.Tensor,
    positives: torch.Tensor,
    row_offset: int,
    inv_temp: float,
    float32_matmul_precision: str = "ieee",
    column_splits: int | None = None,
) -> torch.Tensor:
    """(splits, m, d) partial sums in the accumulation dtype, to be added in split order: per row k,
    sum_j E_kj (scale_rows[k] + scale_columns[j]) columns_j over j other than row_offset + k and positives[k],
    with E_kj = exp(inv_temp * (<rows_k, columns_j> - 1))."""
    _check(rows, columns, row_offset, float32_matmul_precision)
    rows, columns = rows.contiguous(), columns.contiguous()
    m, d = rows.shape
    M = columns.shape[0]
    if scale_rows.shape != (m,) or scale_columns.shape != (M,) or positives.shape != (m,):
        raise ValueError(
            f"scale_rows ({m},), scale_columns ({M},) and positives ({m},) expected, got "
            f"{tuple(scale_rows.shape)}, {tuple(scale_columns.shape)}, {tuple(positives.shape)}"
        )
    acc_dtype, acc_tl = _accumulation(rows.dtype)
    scale_rows = scale_rows.to(device=rows.device, dtype=acc_dtype).contiguous()
    scale_columns = scale_columns.to(device=rows.device, dtype=acc_dtype).contiguous()
    positives = positives.to(device=rows.device, dtype=torch.int64).contiguous()
    if m == 0 or d == 0:
        return torch.zeros((1, m, d), dtype=acc_dtype, device=rows.device)
    launch = _plan(rows, columns, float32_matmul_precision, column_splits).grad
    upcast, w_low, w_scale, precision = _precisions(rows.dtype, float32_matmul_precision)
    one_k = d <= launch.block_k
    partial = torch.empty((launch.column_splits, m, d), dtype=acc_dtype, device=rows.device)
    _launch(
        _row_grad_kernel,
        launch.grid,
        rows,
        columns,
        scale_rows,
        scale_columns,
        positives,
        partial,
        _consts(float(inv_temp), acc_dtype, rows.device),
        m,
        M,
        d,
        int(row_offset),
        launch.split_columns,
        rows.stride(0),
        columns.stride(0),
        partial.stride(0),
        partial.stride(1),
        BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n,
        BLOCK_K=launch.block_k,
        BLOCK_D=launch.block_d,
        ONE_K=one_k,
        SHARE=one_k and launch.grid[1] == 1 and launch.block_d == launch.block_k,
        UPCAST=upcast,
        W_LOW=w_low,
        W_SCALE=w_scale,
        DROP_BITS=_drop_bits(rows.dtype),
        PRECISION=precision,
        ACC=acc_tl,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    return partial  # merged in split order by input_grad

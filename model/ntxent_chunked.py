"""The PyTorch backend of NT-Xent (model/ntxent.py): row chunks of bounded memory, O(chunk x columns) extra
whatever the batch (two chunk x columns tiles, CHUNK_BYTES together in float32, allocated once per call and
reused by every chunk). Same five functions and semantics as ``ntxent_triton`` (whose kernels it also serves
as the reference for); the products run in the accumulation dtype (16-bit inputs are widened: CPUs without
bf16 matrix units multiply float32 faster), so ``float32_matmul_precision`` does not apply, and there is one
column split (partial sums of shape (1, ...))."""

from __future__ import annotations

import torch

from .ntxent_common import NORM_EPS, accumulation_dtype, row_norms

# Memory for the (chunk x columns) float32 tiles of the PyTorch path; sets the chunk height.
CHUNK_BYTES = 128 * 2**20


def chunk_rows(num_columns: int) -> int:
    return max(1, CHUNK_BYTES // (4 * num_columns * 2))


def _exp_scores(
    rows: torch.Tensor,
    columns: torch.Tensor,
    positives: torch.Tensor,
    start: int,
    stop: int,
    row_offset: int,
    inv_temp: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """E = exp((s - 1)/tau) of rows[start:stop] against all columns (unit rows: every E <= 1), with
    each row's own column and its positive's set to 0: the negatives only. Written into
    ``out[:stop - start]``, a tile reused by every chunk (a fresh tile per chunk costs page faults)."""
    scores = out[: stop - start]
    # scale and shift inside the GEMM (beta * shift + alpha * rows @ columns.T): no extra pass
    shift = torch.full((1,), -inv_temp, dtype=out.dtype, device=rows.device)
    torch.addmm(shift, rows[start:stop], columns.T, alpha=inv_temp, out=scores)
    local = torch.arange(stop - start, device=rows.device)
    scores[local, row_offset + start + local] = float(
        "-inf"
    )  # masked by index: exp gives exactly 0
    scores[local, positives[start:stop]] = float("-inf")
    return scores.exp_()


def norm_deficit(norms: torch.Tensor) -> torch.Tensor:
    """1 - ||z_k||^2 of each normalised row, from the inputs' norms: exactly 0 for the rows divided by their norm,
    1 - (||x|| / eps)^2 for those divided by eps (zero rows: 1). With it the positive's shifted logit is
    t_k = (s_k,pos - 1)/tau = -(||z_k - z_pos||^2 + deficit_k + deficit_pos) / (2 tau), exact for near-duplicate
    unit rows (1 - <z_k, z_pos> would keep only the dot product's rounding) and right for rows of any norm."""
    return torch.where(norms > NORM_EPS, 0.0, 1.0 - (norms.clamp_max(NORM_EPS) / NORM_EPS).square())


def normalize(z1, z2, operand_dtype):
    """(rows, operands, norms): rows = [z1; z2] / max(||.||, eps) (m, d) in the accumulation dtype,
    the operands of the products (here: the rows themselves), and the row norms (m,)."""
    both = torch.cat([z1, z2]).to(accumulation_dtype(z1))
    norms = row_norms(both)
    rows = both / norms.clamp_min(NORM_EPS)[:, None]
    return rows, rows, norms


def row_negatives(rows, columns, positives, row_offset: int, inv_temp: float, *_triton_options):
    """(1, m): per row k, sum over columns j other than row_offset + k and positives[k] of exp((s_kj - 1)/tau).
    ``_triton_options`` (the matmul precision, the column splits) are the Triton backend's: ignored here."""
    dtype = accumulation_dtype(rows)
    rows, columns = rows.to(dtype), columns.to(dtype)
    out = torch.empty(rows.shape[0], dtype=dtype, device=rows.device)
    chunk = max(1, min(rows.shape[0], chunk_rows(columns.shape[0])))
    tile = torch.empty((chunk, columns.shape[0]), dtype=dtype, device=rows.device)
    for start in range(0, rows.shape[0], chunk):
        stop = min(start + chunk, rows.shape[0])
        exp_scores = _exp_scores(rows, columns, positives, start, stop, row_offset, inv_temp, tile)
        torch.sum(exp_scores, 1, out=out[start:stop])
    return out[None]


def positive_stats(partials, rows, norms, inv_temp: float):
    """(loss_rows, not_positive, scale), each (m,), from the negatives' partial sums (splits, m), the rows
    and the inputs' norms: loss_k = log1p(r_k), q_k = 1 - p_k,pos = r_k / (1 + r_k), scale_k = 1 /
    sum_{j != k} E_kj, with r_k = neg_k e^{-t_k} and t_k = (s_k,pos - 1)/tau (see ``shifted_positive``)."""
    half = rows.shape[0] // 2
    negatives = partials.sum(0)
    shifted_positive = (rows - rows.roll(-half, 0)).square_().sum(1)
    deficit = norm_deficit(norms)
    shifted_positive += deficit + deficit.roll(-half, 0)
    shifted_positive *= -0.5 * inv_temp
    exp_minus_t = torch.exp(-shifted_positive)
    ratio = negatives * exp_minus_t
    one_plus_ratio = 1.0 + ratio
    return torch.log1p(ratio), ratio / one_plus_ratio, exp_minus_t / one_plus_ratio


def row_grad(
    rows, columns, scale_rows, scale_columns, positives, row_offset, inv_temp, *_triton_options
):
    """(1, m, d): per row k, sum_j E_kj (scale_rows[k] + scale_columns[j]) columns_j over columns j other
    than row_offset + k and positives[k], i.e. sum_j (p_kj + p_jk) z_j over k's negatives (options: as
    ``row_negatives``)."""
    grad = torch.empty(rows.shape, dtype=accumulation_dtype(rows), device=rows.device)
    rows, columns = rows.to(grad.dtype), columns.to(grad.dtype)
    chunk = max(1, min(rows.shape[0], chunk_rows(columns.shape[0])))
    tile = torch.empty((chunk, columns.shape[0]), dtype=grad.dtype, device=rows.device)
    weights_tile = torch.empty_like(tile)
    for start in range(0, rows.shape[0], chunk):
        stop = min(start + chunk, rows.shape[0])
        exp_scores = _exp_scores(rows, columns, positives, start, stop, row_offset, inv_temp, tile)
        # weights E_kj (scale_k + scale_j), built in the second tile (no temporary)
        weights = torch.add(
            scale_rows[start:stop, None], scale_columns[None, :], out=weights_tile[: stop - start]
        )
        torch.mm(weights.mul_(exp_scores), columns, out=grad[start:stop])
    return grad[None]


def input_grad(partials, rows, not_positive, norms, grad_scale, out_dtype):
    """(m, d) in ``out_dtype``: the gradient with respect to the un-normalised inputs [z1; z2], from the
    negatives' partial sums (splits, m, d), the positive pair's exact term -(q_k + q_pos(k)) z_pos(k)
    (k's own loss and its positive's both weigh z_pos by p - 1 = -q), the factor ``grad_scale``
    (grad_loss / (tau m), a 0-d tensor) and the normalisation's backward (g - z <z, g>) / ||x||."""
    half = rows.shape[0] // 2
    grad = partials.sum(0)
    grad -= (not_positive + not_positive.roll(-half, 0))[:, None] * rows.roll(-half, 0)
    grad *= grad_scale
    # d(x / max(||x||, eps)) / dx: the projection away from the row, or nothing where the norm is clamped
    projected = torch.where(
        (norms > NORM_EPS)[:, None], grad - rows * (rows * grad).sum(1, keepdim=True), grad
    )
    return (projected / norms.clamp_min(NORM_EPS)[:, None]).to(out_dtype)

"""NT-Xent (the SimCLR loss) without the 2N x 2N similarity matrix, exact across ranks.

``nt_xent(z1, z2, temperature)`` returns the paper's L: the rows L2-normalised as F.normalize does, each of the
2N anchors scoring the 2N - 1 others, the mean over anchors of ``-log softmax`` of the positive. With unit rows
every logit is at most 1/tau, so a fixed shift replaces the running maximum: one exp per pair in the forward
(the negatives' sum per row) and in the backward (both probabilities from one exp), the positive's term computed
apart and exactly, so the loss and its gradient keep float32's relative precision for near-duplicate views.
Two backends share five functions (``normalize``, ``row_negatives``, ``positive_stats``, ``row_grad``,
``input_grad``): the fused Triton kernels (``ntxent_triton``, CUDA) and ``_chunked`` below (PyTorch, bounded
memory). Under torch.distributed the columns are every rank's rows and averaging gradients over ranks gives the
global-batch gradient exactly. The derivation, precision, temperature floor and distributed contract:
docs/design.md (*The loss*).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Memory for the (chunk x columns) float32 tiles of the PyTorch path; sets the chunk height.
CHUNK_BYTES = 128 * 2**20
# The fixed shift needs exp(-2/tau) normal and exp(2/tau) finite in float32 (2/tau < 87; r_k <= M e^{2/tau}
# stays finite for M < 3e9 columns at 0.03). Kept rather than replaced by per-row maxima, which are not free:
# the backward's single exp per pair relies on the shared shift (per-row shifts need exp(s/tau - lse_k) and
# exp(s/tau - lse_j) apart: 3 exps per pair instead of 2, where at d = 128 in bf16 the H100's exp units already
# need as long as its tensor cores), and on the CPU a per-row maximum alone added 20% to the forward (2N = 8,192).
MIN_TEMPERATURE = 0.03
FLOAT32_MATMUL_PRECISIONS = ("ieee", "tf32")
NORM_EPS = 1e-12  # as F.normalize: rows are x / max(||x||, eps)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """(m,) Euclidean norms of the rows of ``x`` (m, d) without overflow or underflow of the squares (float32
    squares leave its range past norms of ~1e19 and below ~1e-19): each row is divided by the power of two of
    its largest entry first (exact), so the result is bit-identical to the plain norm wherever that is finite
    and nonzero. NaN and inf entries give a NaN or inf norm (they propagate)."""
    tiny_exponent = math.frexp(torch.finfo(x.dtype).tiny)[1] - 1  # tiny = 2^tiny_exponent
    _, exponent = torch.frexp(x.detach().abs().amax(1, keepdim=True))
    # clamped to [tiny, 1/tiny]: subnormal rows scale up exactly, and 2^exponent never overflows
    scale = torch.ldexp(torch.ones_like(x[:, :1]), exponent.clamp(tiny_exponent, -tiny_exponent))
    return torch.linalg.vector_norm(x / scale, dim=1) * scale[:, 0]


def _check_projections(z1: torch.Tensor, z2: torch.Tensor) -> None:
    """The checks every backend (and the reference) shares: one (N, d) shape, N, d >= 1, a float dtype."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"nt_xent expects two (N, d) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape[0] < 1:
        raise ValueError("nt_xent needs at least one pair")
    if z1.shape[1] < 1:
        raise ValueError(f"nt_xent needs projections of width d >= 1, got {tuple(z1.shape)}")
    for z in (z1, z2):
        if z.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"nt_xent takes float32, bfloat16, float16 or float64 projections, got {z.dtype} "
                "(cast them explicitly: the loss would not say which precision it used)"
            )


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """The plain formulation (materialises the 2N x 2N logits): the oracle for tests and benchmarks. Rows are
    x / max(||x||, eps) as F.normalize has them, with the norm taken safely (``row_norms``: F.normalize's
    float32 norm overflows to inf past ~1e19 and zeroes such a row)."""
    _check_projections(z1, z2)
    both = torch.cat([z1, z2])
    z = both / row_norms(both).clamp_min(NORM_EPS)[:, None]
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


# --------------------------------------------------------------------------- PyTorch backend


def _chunk_rows(num_columns: int) -> int:
    return max(1, CHUNK_BYTES // (4 * num_columns * 2))


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for float32/bf16/fp16 inputs, float64 for float64 inputs."""
    return torch.promote_types(tensor.dtype, torch.float32)


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
    scores[local, row_offset + start + local] = float("-inf")  # masked by index: exp gives exactly 0
    scores[local, positives[start:stop]] = float("-inf")
    return scores.exp_()


def norm_deficit(norms: torch.Tensor) -> torch.Tensor:
    """1 - ||z_k||^2 of each normalised row, from the inputs' norms: exactly 0 for the rows divided by their norm,
    1 - (||x|| / eps)^2 for those divided by eps (zero rows: 1). With it the positive's shifted logit is
    t_k = (s_k,pos - 1)/tau = -(||z_k - z_pos||^2 + deficit_k + deficit_pos) / (2 tau), exact for near-duplicate
    unit rows (1 - <z_k, z_pos> would keep only the dot product's rounding) and right for rows of any norm."""
    return torch.where(norms > NORM_EPS, 0.0, 1.0 - (norms.clamp_max(NORM_EPS) / NORM_EPS).square())


class _chunked:
    """The PyTorch backend: row chunks of bounded memory, O(chunk x columns) extra whatever the batch (two
    chunk x columns tiles, CHUNK_BYTES together in float32, allocated once per call and reused by every
    chunk). Same five functions and semantics as ``ntxent_triton`` (whose kernels it also serves as the
    reference for); the products run in the accumulation dtype (16-bit inputs are widened: CPUs without
    bf16 matrix units multiply float32 faster), so ``float32_matmul_precision`` does not apply, and
    there is one column split (partial sums of shape (1, ...))."""

    @staticmethod
    def normalize(z1, z2, operand_dtype):
        """(rows, operands, norms): rows = [z1; z2] / max(||.||, eps) (m, d) in the accumulation dtype,
        the operands of the products (here: the rows themselves), and the row norms (m,)."""
        both = torch.cat([z1, z2]).to(accumulation_dtype(z1))
        norms = row_norms(both)
        rows = both / norms.clamp_min(NORM_EPS)[:, None]
        return rows, rows, norms

    @staticmethod
    def row_negatives(
        rows, columns, positives, row_offset: int, inv_temp: float, float32_matmul_precision="ieee", column_splits=None
    ) -> torch.Tensor:
        """(1, m): per row k, sum over columns j other than row_offset + k and positives[k] of exp((s_kj - 1)/tau)."""
        dtype = accumulation_dtype(rows)
        rows, columns = rows.to(dtype), columns.to(dtype)
        out = torch.empty(rows.shape[0], dtype=dtype, device=rows.device)
        chunk = max(1, min(rows.shape[0], _chunk_rows(columns.shape[0])))
        tile = torch.empty((chunk, columns.shape[0]), dtype=dtype, device=rows.device)
        for start in range(0, rows.shape[0], chunk):
            stop = min(start + chunk, rows.shape[0])
            exp_scores = _exp_scores(rows, columns, positives, start, stop, row_offset, inv_temp, tile)
            torch.sum(exp_scores, 1, out=out[start:stop])
        return out[None]

    @staticmethod
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

    @staticmethod
    def row_grad(
        rows,
        columns,
        scale_rows,
        scale_columns,
        positives,
        row_offset: int,
        inv_temp: float,
        float32_matmul_precision="ieee",
        column_splits=None,
    ) -> torch.Tensor:
        """(1, m, d): per row k, sum_j E_kj (scale_rows[k] + scale_columns[j]) columns_j over columns j other
        than row_offset + k and positives[k], i.e. sum_j (p_kj + p_jk) z_j over k's negatives."""
        grad = torch.empty(rows.shape, dtype=accumulation_dtype(rows), device=rows.device)
        rows, columns = rows.to(grad.dtype), columns.to(grad.dtype)
        chunk = max(1, min(rows.shape[0], _chunk_rows(columns.shape[0])))
        tile = torch.empty((chunk, columns.shape[0]), dtype=grad.dtype, device=rows.device)
        weights_tile = torch.empty_like(tile)
        for start in range(0, rows.shape[0], chunk):
            stop = min(start + chunk, rows.shape[0])
            exp_scores = _exp_scores(rows, columns, positives, start, stop, row_offset, inv_temp, tile)
            # weights E_kj (scale_k + scale_j), built in the second tile (no temporary)
            weights = torch.add(scale_rows[start:stop, None], scale_columns[None, :], out=weights_tile[: stop - start])
            torch.mm(weights.mul_(exp_scores), columns, out=grad[start:stop])
        return grad[None]

    @staticmethod
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
        projected = torch.where((norms > NORM_EPS)[:, None], grad - rows * (rows * grad).sum(1, keepdim=True), grad)
        return (projected / norms.clamp_min(NORM_EPS)[:, None]).to(out_dtype)


def _backend(name: str, tensor: torch.Tensor):
    if name == "auto":
        name = "triton" if tensor.is_cuda else "chunked"
    if name == "triton":
        from . import ntxent_triton

        return ntxent_triton
    if name == "chunked":
        return _chunked
    raise ValueError(f"unknown NT-Xent backend {name!r}: use 'auto', 'triton' or 'chunked'")


# --------------------------------------------------------------------------- autograd


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (no autograd: the backward handles the columns)."""
    if world == 1:
        return tensor
    out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_into_tensor(out, tensor.contiguous())
    return out


@functools.lru_cache(maxsize=16)
def _positives(num_rows: int, row_offset: int, device: torch.device) -> torch.Tensor:
    """(m,) column index of each local row's positive: row k of [z1; z2] pairs with row (k + N) mod 2N."""
    local = torch.arange(num_rows, device=device)
    return row_offset + (local + num_rows // 2) % num_rows


class _NTXent(torch.autograd.Function):
    """z1, z2: (N, d) projections of one dtype; the backend normalises them (float32 rows, float64 for
    float64 inputs) and multiplies them in the inputs' dtype (16-bit operands for the tensor cores) on the
    Triton backend. Five backend calls in all: normalize, row_negatives and positive_stats forward,
    row_grad and input_grad backward (on CUDA: five kernels, plus the loss's mean and the gradient's scale)."""

    @staticmethod
    def forward(
        ctx, z1: torch.Tensor, z2: torch.Tensor, temperature: float, backend_name: str, float32_matmul_precision: str
    ):
        # The precision is chosen here, not by an enclosing autocast (which would run the chunked path's
        # float32 products in bf16).
        with torch.autocast(z1.device.type, enabled=False):
            return _NTXent._forward(ctx, z1, z2, temperature, backend_name, float32_matmul_precision)

    @staticmethod
    def _forward(ctx, z1, z2, temperature, backend_name, float32_matmul_precision):
        rank, world = _world()
        backend = _backend(backend_name, z1)
        rows, operands, norms = backend.normalize(z1, z2, z1.dtype)
        num_rows = rows.shape[0]
        columns = _all_gather(operands, world)
        row_offset = rank * num_rows
        inv_temp = 1.0 / temperature
        positives = _positives(num_rows, row_offset, rows.device)
        partials = backend.row_negatives(operands, columns, positives, row_offset, inv_temp, float32_matmul_precision)
        loss_rows, not_positive, scale = backend.positive_stats(partials, rows, norms, inv_temp)
        scale_columns = _all_gather(scale, world)
        ctx.save_for_backward(rows, columns, scale, scale_columns, not_positive, norms, positives)
        ctx.temperature, ctx.row_offset, ctx.backend = temperature, row_offset, backend
        ctx.precision, ctx.input_dtype = float32_matmul_precision, z1.dtype
        return loss_rows.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        with torch.autocast(grad_loss.device.type, enabled=False):
            return _NTXent._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        rows, columns, scale, scale_columns, not_positive, norms, positives = ctx.saved_tensors
        inv_temp = 1.0 / ctx.temperature
        num_rows = rows.shape[0]
        operands = columns[ctx.row_offset : ctx.row_offset + num_rows]  # the local rows, as the products take them
        partials = ctx.backend.row_grad(
            operands, columns, scale, scale_columns, positives, ctx.row_offset, inv_temp, ctx.precision
        )
        grad_scale = grad_loss.to(rows.dtype) * (inv_temp / num_rows)
        grad = ctx.backend.input_grad(partials, rows, not_positive, norms, grad_scale, ctx.input_dtype)
        return grad[: num_rows // 2], grad[num_rows // 2 :], None, None, None


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    backend: str = "auto",
    *,
    float32_matmul_precision: Literal["ieee", "tf32"] = "ieee",
) -> torch.Tensor:
    """The SimCLR loss of projections ``z1``, ``z2`` (N, d); a scalar; see the module docstring.

    ``backend``: 'auto' (fused Triton kernels for CUDA tensors, the chunked PyTorch path elsewhere),
    'triton' or 'chunked'. Inputs may be float32, bfloat16/float16 (pass the autocast output as it is:
    the Triton backend's products then run on the tensor cores with float32 accumulation; the
    normalisation, the positive term and all statistics stay float32) or float64 (everything float64).
    The gradients come back in the inputs' dtype.

    ``float32_matmul_precision``: how the Triton backend multiplies *float32* inputs: 'ieee' (default:
    exact float32 products, on the FMA units) or 'tf32' (tensor cores, 10-bit mantissas: each logit
    s/tau carries ~1e-3/tau absolute error, so expect ~1e-3 relative error in loss and gradients, and
    more when positives are strong). No effect on 16-bit or float64 inputs, nor on the chunked backend.

    Any input: zero rows and rows of norm <= 1e-12 are divided by 1e-12 (a zero row is a zero vector, as in
    F.normalize), norms up to float's range are fine (1e-30 .. 1e30 in float32). ValueError, on both backends
    alike, for d = 0 or dtypes other than float32/bfloat16/float16/float64 (integers are not cast). NaN or inf
    entries are not checked (that would cost a host sync per step): they propagate, on both backends, to a NaN
    loss and NaN gradients.
    """
    _check_projections(z1, z2)
    if not temperature >= MIN_TEMPERATURE:
        raise ValueError(
            f"temperature {temperature} is below the supported {MIN_TEMPERATURE} "
            "(the fixed shift needs exp(+-2/tau) within float32's normal range)"
        )
    if float32_matmul_precision not in FLOAT32_MATMUL_PRECISIONS:
        raise ValueError(
            f"float32_matmul_precision must be one of {FLOAT32_MATMUL_PRECISIONS}, got {float32_matmul_precision!r}"
        )
    if z1.dtype != z2.dtype:  # as torch.cat would
        dtype = torch.promote_types(z1.dtype, z2.dtype)
        z1, z2 = z1.to(dtype), z2.to(dtype)
    return _NTXent.apply(z1, z2, float(temperature), backend, float32_matmul_precision)


def positive_pair_accuracy(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Fraction of the 2N local anchors whose most similar other row is their positive (a training meter).

    Local rows only (it is a meter, not the loss), in chunks so it never holds the full matrix."""
    z = F.normalize(torch.cat([z1, z2]).detach().float(), dim=1)
    n = z1.shape[0]
    correct = 0
    chunk = _chunk_rows(z.shape[0])
    for start in range(0, 2 * n, chunk):
        stop = min(start + chunk, 2 * n)
        scores = z[start:stop] @ z.T
        local = torch.arange(stop - start, device=z.device)
        scores[local, start + local] = float("-inf")
        correct = correct + (scores.argmax(1) == (start + local + n) % (2 * n)).sum()
    return correct / (2 * n)

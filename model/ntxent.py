"""NT-Xent (the SimCLR loss) without the 2N x 2N similarity matrix, exact across ranks.

``nt_xent(z1, z2, temperature)`` returns the paper's L: the rows L2-normalised as F.normalize does, each of the
2N anchors scoring the 2N - 1 others, the mean over anchors of ``-log softmax`` of the positive. With unit rows
every logit is at most 1/tau, so a fixed shift replaces the running maximum: one exp per pair in the forward
(the negatives' sum per row) and in the backward (both probabilities from one exp), the positive's term computed
apart and exactly, so the loss and its gradient keep float32's relative precision for near-duplicate views.
Two backends share five functions (``normalize``, ``row_negatives``, ``positive_stats``, ``row_grad``,
``input_grad``): the fused Triton kernels (``ntxent_triton``, CUDA) and ``ntxent_chunked`` (PyTorch, bounded
memory). Under torch.distributed the columns are every rank's rows and averaging gradients over ranks gives the
global-batch gradient exactly. The derivation, precision, temperature floor and distributed contract:
docs/design.md (*The loss*).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import ntxent_chunked, supcon
from .ntxent_common import (
    FLOAT32_MATMUL_PRECISIONS,
    MIN_TEMPERATURE,
    NORM_EPS,
    SUPPORTED_DTYPES,
    row_norms,
)


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


def _backend(name: str, tensor: torch.Tensor):
    if name == "auto":
        name = "triton" if tensor.is_cuda else "chunked"
    if name == "triton":
        from . import ntxent_triton

        return ntxent_triton
    if name == "chunked":
        return ntxent_chunked
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
    out = torch.empty(
        (world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device
    )
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
        ctx,
        z1: torch.Tensor,
        z2: torch.Tensor,
        labels: torch.Tensor | None,
        temperature: float,
        backend_name: str,
        float32_matmul_precision: str,
    ):
        # The precision is chosen here, not by an enclosing autocast (which would run the chunked path's
        # float32 products in bf16).
        with torch.autocast(z1.device.type, enabled=False):
            return _NTXent._forward(
                ctx, z1, z2, labels, temperature, backend_name, float32_matmul_precision
            )

    @staticmethod
    def _forward(ctx, z1, z2, labels, temperature, backend_name, float32_matmul_precision):
        rank, world = _world()
        backend = _backend(backend_name, z1)
        rows, operands, norms = backend.normalize(z1, z2, z1.dtype)
        num_rows = rows.shape[0]
        columns = _all_gather(operands, world)
        row_offset = rank * num_rows
        inv_temp = 1.0 / temperature
        positives = _positives(num_rows, row_offset, rows.device)
        partials = backend.row_negatives(
            operands, columns, positives, row_offset, inv_temp, float32_matmul_precision
        )
        loss_rows, not_positive, scale = backend.positive_stats(partials, rows, norms, inv_temp)
        scale_columns = _all_gather(scale, world)
        ctx.supcon = labels is not None
        supcon_terms = ()
        if ctx.supcon:  # the per-class sums; the loss of each anchor over all its positives
            groups, counts = supcon.class_groups(labels, rank, world)
            sums = supcon.class_sums(rows, groups, counts.shape[0], world)
            supcon_terms = supcon.positive_terms(rows, groups, counts, sums)
            loss_rows = loss_rows + supcon.loss_correction(rows, *supcon_terms, inv_temp)
        ctx.save_for_backward(
            rows, columns, scale, scale_columns, not_positive, norms, positives, *supcon_terms
        )
        ctx.temperature, ctx.row_offset, ctx.backend = temperature, row_offset, backend
        ctx.precision, ctx.input_dtype = float32_matmul_precision, z1.dtype
        return loss_rows.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        with torch.autocast(grad_loss.device.type, enabled=False):
            return _NTXent._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        rows, columns, scale, scale_columns, not_positive, norms, positives, *supcon_terms = (
            ctx.saved_tensors
        )
        inv_temp = 1.0 / ctx.temperature
        num_rows = rows.shape[0]
        operands = columns[
            ctx.row_offset : ctx.row_offset + num_rows
        ]  # the local rows, as the products take them
        partials = ctx.backend.row_grad(
            operands,
            columns,
            scale,
            scale_columns,
            positives,
            ctx.row_offset,
            inv_temp,
            ctx.precision,
        )
        if ctx.supcon:  # SupCon's positive term, as one more split of the partial sums
            partials = torch.cat([partials, supcon.grad_split(rows, *supcon_terms)])
        grad_scale = grad_loss.to(rows.dtype) * (inv_temp / num_rows)
        grad = ctx.backend.input_grad(
            partials, rows, not_positive, norms, grad_scale, ctx.input_dtype
        )
        return grad[: num_rows // 2], grad[num_rows // 2 :], None, None, None, None


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    backend: str = "auto",
    *,
    labels: torch.Tensor | None = None,
    float32_matmul_precision: Literal["ieee", "tf32"] = "ieee",
) -> torch.Tensor:
    """The SimCLR loss of projections ``z1``, ``z2`` (N, d); a scalar; see the module docstring.

    ``labels``: None (NT-Xent), or an integer tensor (N,) of each pair's class: then the supervised contrastive
    loss (SupCon, model/supcon.py), where every other row of the same label is a positive of an anchor (across
    processes too: every process passes its own pairs' labels). With all labels distinct it is NT-Xent.

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
    if labels is not None:
        supcon.check_labels(labels, z1.shape[0])
        labels = labels.to(z1.device)
    return _NTXent.apply(z1, z2, labels, float(temperature), backend, float32_matmul_precision)


def positive_pair_accuracy(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Fraction of the 2N local anchors whose most similar other row is their positive (a training meter).

    Local rows only (it is a meter, not the loss), in chunks so it never holds the full matrix."""
    z = F.normalize(torch.cat([z1, z2]).detach().float(), dim=1)
    n = z1.shape[0]
    correct = 0
    chunk = ntxent_chunked.chunk_rows(z.shape[0])
    for start in range(0, 2 * n, chunk):
        stop = min(start + chunk, 2 * n)
        scores = z[start:stop] @ z.T
        local = torch.arange(stop - start, device=z.device)
        scores[local, start + local] = float("-inf")
        correct = correct + (scores.argmax(1) == (start + local + n) % (2 * n)).sum()
    return correct / (2 * n)

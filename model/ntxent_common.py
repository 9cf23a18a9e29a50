"""What both NT-Xent backends (model/ntxent_chunked.py, model/ntxent_triton.py) and the autograd function
(model/ntxent.py) share, defined once: the normalisation's epsilon, the supported dtypes and float32 matmul
precisions, the temperature floor, the accumulation dtype and the overflow-free row norms."""

from __future__ import annotations

import math

import torch

# The fixed shift needs exp(-2/tau) normal and exp(2/tau) finite in float32 (2/tau < 87; r_k <= M e^{2/tau}
# stays finite for M < 3e9 columns at 0.03). Kept rather than replaced by per-row maxima, which are not free:
# the backward's single exp per pair relies on the shared shift (per-row shifts need exp(s/tau - lse_k) and
# exp(s/tau - lse_j) apart: 3 exps per pair instead of 2, where at d = 128 in bf16 the H100's exp units already
# need as long as its tensor cores), and on the CPU a per-row maximum alone added 20% to the forward (2N = 8,192).
MIN_TEMPERATURE = 0.03
FLOAT32_MATMUL_PRECISIONS = ("ieee", "tf32")
NORM_EPS = 1e-12  # as F.normalize: rows are x / max(||x||, eps)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for float32/bf16/fp16 inputs, float64 for float64 inputs."""
    return torch.promote_types(tensor.dtype, torch.float32)


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

"""NT-Xent (the SimCLR loss) without the 2N x 2N similarity matrix, exact across ranks.

``nt_xent(z1, z2, temperature)``: z1, z2 are (N, d) projections of the two views (row i of each is a
positive pair). The rows are L2-normalised, the 2N anchors each score the 2N - 1 others (itself
excluded), and the loss is the mean over anchors of ``-log softmax`` of the positive: the paper's L.

How it is computed (one mechanism, two backends for the heavy part):
- forward: per anchor row, the log-sum-exp over all columns but its own (``row_lse``), O(2N) memory;
- backward: with every row's lse known, dL/dz_k = 1/(M tau) [sum_j (p_kj + p_jk) z_j - 2 z_pos(k)],
  computed row-parallel over column tiles (``row_grad``) without atomics and without the matrix; the
  positive pair's term is added here in float32 (it nearly cancels when p_pos -> 1).
The backends: ``ntxent_triton`` (fused Triton kernels, CUDA tensors) and ``_chunked`` below (PyTorch,
row chunks of bounded memory, everywhere else).

Under torch.distributed (world size W > 1): each rank's anchors are its 2N local rows; the columns are
all ranks' rows (gathered, W * 2N); the value returned is the mean over the local anchors. The backward
returns, for the local rows, the gradient of the sum of all ranks' losses, so that averaging gradients
over ranks (what DDP does) gives exactly the gradient of the global-batch loss. Only the rows and the
per-row lse (W * 2N floats) cross the wire; no rank materialises another rank's statistics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Memory for the (chunk x columns) float32 tiles of the PyTorch path; sets the chunk height.
CHUNK_BYTES = 128 * 2**20
# Logits are shifted by their bound 1/tau, so exp(-2/tau) (two opposite rows) must not underflow float32.
MIN_TEMPERATURE = 0.03


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """The plain formulation (materialises the 2N x 2N logits): the oracle for tests and benchmarks."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
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


def _scores(rows: torch.Tensor, columns: torch.Tensor, start: int, stop: int, row_offset: int, inv_temp: float,
            out: torch.Tensor) -> torch.Tensor:
    """Logits (accumulation dtype) of rows[start:stop] against all columns, shifted by the bound 1/tau
    so that every exp is <= 1 (unit-norm rows: s_ij <= 1), with the diagonal at -inf. Written into
    ``out[:stop - start]``, a tile reused by every chunk (a fresh tile per chunk costs page faults)."""
    scores = out[: stop - start]
    # scale and shift inside the GEMM (beta * shift + alpha * rows @ columns.T): no extra pass
    shift = torch.full((1,), -inv_temp, dtype=out.dtype, device=rows.device)
    torch.addmm(shift, rows[start:stop], columns.T, alpha=inv_temp, out=scores)
    local = torch.arange(stop - start, device=rows.device)
    scores[local, row_offset + start + local] = float("-inf")
    return scores


class _chunked:
    """Row chunks of bounded memory: O(chunk x columns) extra, whatever the batch (two chunk x columns
    tiles, CHUNK_BYTES together in float32, allocated once per call and reused by every chunk)."""

    @staticmethod
    def row_lse(rows, columns, row_offset: int, inv_temp: float) -> torch.Tensor:
        dtype = accumulation_dtype(rows)
        rows, columns = rows.to(dtype), columns.to(dtype)  # 16-bit inputs: scores in float32, not rounded to 16 bits
        lse = torch.empty(rows.shape[0], dtype=dtype, device=rows.device)
        chunk = max(1, min(rows.shape[0], _chunk_rows(columns.shape[0])))
        tile = torch.empty((chunk, columns.shape[0]), dtype=dtype, device=rows.device)
        for start in range(0, rows.shape[0], chunk):
            stop = min(start + chunk, rows.shape[0])
            torch.sum(_scores(rows, columns, start, stop, row_offset, inv_temp, tile).exp_(), 1, out=lse[start:stop])
        return lse.log_().add_(inv_temp)

    @staticmethod
    def row_grad(rows, columns, lse_rows, lse_columns, positives, row_offset: int, inv_temp: float) -> torch.Tensor:
        """sum_j (p_kj + p_jk) c_j over columns j other than k itself and its positive, per row k."""
        grad = torch.empty(rows.shape, dtype=accumulation_dtype(rows), device=rows.device)
        rows, columns = rows.to(grad.dtype), columns.to(grad.dtype)
        # p_kj = E_kj a_k and p_jk = E_kj b_j, with E = exp(s/tau - 1/tau): one exp per pair.
        a = torch.exp(inv_temp - lse_rows)
        b = torch.exp(inv_temp - lse_columns)
        chunk = max(1, min(rows.shape[0], _chunk_rows(columns.shape[0])))
        tile = torch.empty((chunk, columns.shape[0]), dtype=grad.dtype, device=rows.device)
        weights_tile = torch.empty_like(tile)
        for start in range(0, rows.shape[0], chunk):
            stop = min(start + chunk, rows.shape[0])
            scores = _scores(rows, columns, start, stop, row_offset, inv_temp, tile).exp_()
            scores[torch.arange(stop - start, device=rows.device), positives[start:stop]] = 0.0
            # weights E_kj (a_k + b_j), built in the second tile (no temporary)
            weights = torch.add(a[start:stop, None], b[None, :], out=weights_tile[: stop - start]).mul_(scores)
            torch.mm(weights, columns, out=grad[start:stop])
        return grad


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


class _NTXent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, temperature: float, backend_name: str):
        rank, world = _world()
        num_rows = rows.shape[0]
        half = num_rows // 2
        backend = _backend(backend_name, rows)
        rows = rows.contiguous()
        columns = _all_gather(rows, world)
        row_offset = rank * num_rows
        inv_temp = 1.0 / temperature
        lse_rows = backend.row_lse(rows, columns, row_offset, inv_temp)
        local = torch.arange(num_rows, device=rows.device)
        positives = row_offset + (local + half) % num_rows  # column index of each row's positive
        rows_acc = rows.to(accumulation_dtype(rows))
        positive_logits = (rows_acc * rows_acc.roll(-half, 0)).sum(1) * inv_temp
        loss = (lse_rows - positive_logits).mean()
        lse_columns = _all_gather(lse_rows, world)
        ctx.save_for_backward(rows, columns, lse_rows, lse_columns, positives, positive_logits)
        ctx.temperature, ctx.row_offset, ctx.backend = temperature, row_offset, backend
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        rows, columns, lse_rows, lse_columns, positives, positive_logits = ctx.saved_tensors
        inv_temp = 1.0 / ctx.temperature
        num_rows = rows.shape[0]
        grad = ctx.backend.row_grad(rows, columns, lse_rows, lse_columns, positives, ctx.row_offset, inv_temp)
        # The positive pair, in float32 (or float64): (p_k,pos + p_pos,k - 2) z_pos.
        p_forward = torch.exp(positive_logits - lse_rows)
        p_backward = torch.exp(positive_logits - lse_columns[positives])
        grad += (p_forward + p_backward - 2.0)[:, None] * rows.to(grad.dtype).roll(-(num_rows // 2), 0)
        grad *= grad_loss * inv_temp / num_rows
        return grad.to(rows.dtype), None, None


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, backend: str = "auto") -> torch.Tensor:
    """The SimCLR loss of projections ``z1``, ``z2`` (N, d); see the module docstring.

    ``backend``: 'auto' (fused Triton kernels for CUDA tensors, the chunked PyTorch path elsewhere),
    'triton' or 'chunked'. Inputs may be float32 or bfloat16/float16 (statistics accumulate in float32).
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent expects two (N, d) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 1:
        raise ValueError("nt_xent needs at least one pair")
    if not temperature >= MIN_TEMPERATURE:
        raise ValueError(f"temperature {temperature} is below the supported {MIN_TEMPERATURE} (exp(-2/tau) must stay a normal float32)")
    rows = F.normalize(torch.cat([z1, z2]), dim=1)
    return _NTXent.apply(rows, float(temperature), backend)


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

"""NT-Xent: the reference against a hand computation, the memory-light path against the float64
reference (loss and gradients), and the distributed semantics with 2 gloo processes."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import model.ntxent as ntxent
from model.ntxent import nt_xent, nt_xent_reference, positive_pair_accuracy


def hand_computed_loss(z1, z2, temperature):
    """Straight from the paper's definition, in Python floats (float64)."""
    rows = [list(map(float, r)) for r in torch.cat([z1, z2])]
    rows = [[x / math.sqrt(sum(v * v for v in r)) for x in r] for r in rows]
    n2, n = len(rows), len(rows) // 2
    total = 0.0
    for i in range(n2):
        sims = [sum(a * b for a, b in zip(rows[i], rows[j])) / temperature for j in range(n2)]
        positive = (i + n) % n2
        denominator = sum(math.exp(sims[j]) for j in range(n2) if j != i)
        total += -math.log(math.exp(sims[positive]) / denominator)
    return total / n2


def test_reference_matches_hand_computation():
    z1 = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]], dtype=torch.float64)
    z2 = torch.tensor([[0.9, 0.1, 1.5], [0.0, -2.0, 1.0]], dtype=torch.float64)
    for temperature in (0.1, 0.5):
        expected = hand_computed_loss(z1, z2, temperature)
        assert nt_xent_reference(z1, z2, temperature).item() == pytest.approx(expected, rel=1e-12)
        assert nt_xent(z1, z2, temperature).item() == pytest.approx(expected, rel=1e-9)


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("n,d,temperature", [(1, 4, 0.1), (5, 3, 0.5), (37, 16, 0.1), (64, 128, 0.05), (100, 32, 0.2)])
@pytest.mark.parametrize("chunk_bytes", [None, 200])
def test_chunked_matches_float64_reference(n, d, temperature, chunk_bytes, monkeypatch):
    if chunk_bytes:  # force many row chunks
        monkeypatch.setattr(ntxent, "CHUNK_BYTES", chunk_bytes * n)
    torch.manual_seed(n * d)
    z1 = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    reference = nt_xent_reference(z1, z2, temperature)
    grads_ref = torch.autograd.grad(reference * 3.0, [z1, z2])  # a non-unit upstream gradient
    a, b = (z.detach().float().requires_grad_() for z in (z1, z2))
    loss = nt_xent(a, b, temperature, backend="chunked")
    grads = torch.autograd.grad(loss * 3.0, [a, b])
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    for got, want in zip(grads, grads_ref):
        # relative error, with an absolute floor for N = 1 where the exact gradient is zero
        assert (got.double() - want).norm() <= 1e-4 * want.norm() + 1e-5


def test_bf16_inputs_within_tolerance():
    torch.manual_seed(0)
    z1, z2 = torch.randn(50, 64, dtype=torch.float64), torch.randn(50, 64, dtype=torch.float64)
    reference = nt_xent_reference(z1, z2, 0.1)
    a, b = (z.to(torch.bfloat16).requires_grad_() for z in (z1, z2))
    loss = nt_xent(a, b, 0.1)
    loss.backward()
    assert relative_error(loss.detach(), reference) < 2e-2
    assert a.grad.dtype == torch.bfloat16


def test_well_trained_pairs_keep_exact_gradients():
    """p_pos -> 1: the gradient is tiny and comes from (p_pos - 1); it must still match float64."""
    torch.manual_seed(1)
    base = torch.randn(32, 16, dtype=torch.float64)
    z1 = (base + 1e-3 * torch.randn_like(base)).requires_grad_()
    z2 = (base + 1e-3 * torch.randn_like(base)).requires_grad_()
    grads_ref = torch.autograd.grad(nt_xent_reference(z1, z2, 0.05), [z1, z2])
    a, b = (z.detach().float().requires_grad_() for z in (z1, z2))
    grads = torch.autograd.grad(nt_xent(a, b, 0.05), [a, b])
    for got, want in zip(grads, grads_ref):
        assert relative_error(got, want) < 1e-3


def test_memory_stays_linear():
    """2N = 8192 rows: the reference needs a 2N x 2N matrix (256 MiB fp32); the chunked path's extra
    memory is bounded by CHUNK_BYTES, whatever 2N. Checked via the largest tensor it allocates."""
    sizes = []
    original = torch.Tensor.exp_

    def spy(self):
        sizes.append(self.numel() * self.element_size())
        return original(self)

    torch.manual_seed(0)
    z1, z2 = torch.randn(4096, 32, requires_grad=True), torch.randn(4096, 32, requires_grad=True)
    torch.Tensor.exp_ = spy
    try:
        nt_xent(z1, z2, 0.1).backward()
    finally:
        torch.Tensor.exp_ = original
    assert sizes and max(sizes) <= ntxent.CHUNK_BYTES


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="two \\(N, d\\) tensors"):
        nt_xent(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 8), torch.randn(4, 8), temperature=0.001)


def test_positive_pair_accuracy():
    z = torch.eye(6)
    assert positive_pair_accuracy(z[:3], z[:3] + 0.01).item() == 1.0
    assert positive_pair_accuracy(z[:3], z[3:]).item() < 1.0


# ---------------------------------------------------------------- distributed: 2 gloo processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_worker(rank, world, port, z1_all, z2_all, temperature, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = z1_all.shape[0] // world
        # A shared linear layer stands in for the network: DDP-style averaging of its gradient must
        # equal the single-process gradient of the global batch.
        torch.manual_seed(0)
        layer = torch.nn.Linear(z1_all.shape[1], 8, dtype=torch.float64)
        z1 = layer(z1_all[rank * n : (rank + 1) * n])
        z2 = layer(z2_all[rank * n : (rank + 1) * n])
        loss = nt_xent(z1, z2, temperature)
        loss.backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        for g in grads:
            dist.all_reduce(g)
            g /= world
        out[rank] = (loss.detach(), grads)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_single_process_global_batch():
    torch.manual_seed(3)
    world, n, d, temperature = 2, 6, 5, 0.2
    z1_all = torch.randn(world * n, d, dtype=torch.float64)
    z2_all = torch.randn(world * n, d, dtype=torch.float64)
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.start_processes(_rank_worker, args=(world, _free_port(), z1_all, z2_all, temperature, out), nprocs=world, start_method="spawn")

    torch.manual_seed(0)
    layer = torch.nn.Linear(d, 8, dtype=torch.float64)
    reference = nt_xent_reference_ranked(layer(z1_all), layer(z2_all), temperature, world, n)
    reference.backward()
    expected = [p.grad for p in layer.parameters()]
    for rank in range(world):
        _, grads = out[rank]
        for got, want in zip(grads, expected):
            assert relative_error(got, want) < 1e-10
    # Each rank's value is the mean over its own anchors; their mean is the global loss.
    assert (out[0][0] + out[1][0]).item() / 2 == pytest.approx(reference.item(), rel=1e-10)


def nt_xent_reference_ranked(z1, z2, temperature, world, n):
    """Global-batch reference with the rows ordered as the ranks hold them: rank r contributes
    [z1 of its n samples; z2 of its n samples]. (The loss does not depend on row order; the ordering
    here only keeps positive pairs aligned when gathering.)"""
    import torch.nn.functional as F

    rows = torch.cat([torch.cat([z1[r * n : (r + 1) * n], z2[r * n : (r + 1) * n]]) for r in range(world)])
    rows = F.normalize(rows, dim=1)
    logits = rows @ rows.T / temperature
    logits = logits.masked_fill(torch.eye(len(rows), dtype=torch.bool), float("-inf"))
    local = torch.arange(2 * n)
    targets = torch.cat([r * 2 * n + (local + n) % (2 * n) for r in range(world)])
    return F.cross_entropy(logits, targets)

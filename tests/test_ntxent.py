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
from ntxent_properties import (
    adversarial_batches,
    check_against_reference,
    check_non_finite_propagates,
    check_rejections,
    gradient_scales,
    independent_loss_and_grads,
    row_relative_errors,
)

import simclr_dali.model.ntxent as ntxent
import simclr_dali.model.ntxent_chunked as ntxent_chunked
from simclr_dali.model.ntxent import nt_xent, nt_xent_reference, positive_pair_accuracy


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_an_independent_formula_for_every_norm(dtype):
    """The oracle itself on zero rows, rows of norm <= 1e-12, norms 1e-30..1e30 (float64: 1e-300..1e300), all-zero
    batches and identical views: against numpy with math.hypot norms and the textbook gradient. In float32 too,
    where F.normalize's norm overflows to inf past ~1e19 and would zero the row (measured: worst 3.3e-7)."""
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for seed in range(3):
        for name, z1, z2 in adversarial_batches(dtype, seed):
            r1, r2 = (z.to(dtype, copy=True).requires_grad_() for z in (z1, z2))
            reference = nt_xent_reference(r1, r2, 0.1)
            grads = torch.autograd.grad(reference * 3.0, [r1, r2])
            loss, *want = independent_loss_and_grads(z1, z2, 0.1, grad_loss=3.0)
            assert reference.item() == pytest.approx(loss, rel=tol, abs=tol), (name, seed)
            for got, expected, z in zip(grads, want, (z1, z2)):
                assert (
                    row_relative_errors(got, expected, gradient_scales(z, 0.1, 3.0)).max().item()
                    <= tol
                ), (
                    name,
                    seed,
                )


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_chunked_exact_for_every_norm(dtype, tol):
    """Zero rows (zero vectors, as in the reference and every peer), rows of norm <= 1e-12 (divided by eps),
    norms 1e-30..1e30, all-zero batches (log(2N - 1)), identical views: loss and every row's gradient within
    ``tol`` of the float64 reference (float32 measured: worst 6.6e-7 over 30 seeds; before the fix one zero
    row among 6 gave 98% error)."""
    worst = check_against_reference(
        nt_xent, nt_xent_reference, dtype, seeds=range(3), tol=tol, backend="chunked"
    )
    print(f"chunked {dtype}: worst relative error {worst:.1e}")


def test_one_zero_row_and_a_collapsed_batch():
    """The issue's two cases, by value: a zero row's positive logit is 0 (not that of a unit row), and a batch
    of zero rows scores every pair alike: log(2N - 1)."""
    gen = torch.Generator().manual_seed(0)
    z1, z2 = (
        torch.randn(4, 8, generator=gen, dtype=torch.float64),
        torch.randn(4, 8, generator=gen, dtype=torch.float64),
    )
    z1[0] = 0.0
    assert nt_xent(z1.float(), z2.float(), 0.1).item() == pytest.approx(
        nt_xent_reference(z1, z2, 0.1).item(), rel=1e-6
    )
    zeros = torch.zeros(16, 128)
    assert nt_xent(zeros, zeros, 0.1).item() == pytest.approx(math.log(31), rel=1e-6)


def test_non_finite_inputs_propagate():
    check_non_finite_propagates(nt_xent, backend="chunked")
    check_non_finite_propagates(nt_xent_reference)


def test_d_zero_and_integer_inputs_raise_the_same_error_on_both_backends():
    """Checked before the backend is chosen: the Triton backend (not importable without CUDA here unless under
    the interpreter) raises the very same ValueError."""
    check_rejections(nt_xent)


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    "n,d,temperature", [(1, 4, 0.1), (5, 3, 0.5), (37, 16, 0.1), (64, 128, 0.05), (100, 32, 0.2)]
)
@pytest.mark.parametrize("chunk_bytes", [None, 200])
def test_chunked_matches_float64_reference(n, d, temperature, chunk_bytes, monkeypatch):
    if chunk_bytes:  # force many row chunks
        monkeypatch.setattr(ntxent_chunked, "CHUNK_BYTES", chunk_bytes * n)
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


def near_duplicate_views(n, d, dtype, seed, noise=1e-2):
    """Two views = one random base + independent noise of relative size ~noise: strong positives. Float64
    tensors holding ``dtype``-representable values (the reference sees exactly what the loss sees)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=gen, dtype=torch.float64)
    views = (base + noise * torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    return tuple(view.to(dtype).double() for view in views)


# (loss, gradient) tolerances relative to float64 on the same inputs, in the saturated regime:
# float32 1e-5 (the target; measured ~1e-6, where eager float32 autograd of the reference gets ~1e-3
# and the previous p_pos - 1 formulation ~4e-2); bfloat16 5e-3 for the gradient, which is returned in
# bfloat16 (unit roundoff 2^-9 ~ 2e-3: rounding a vector costs ~1.7e-3 of its norm, measured), while the
# chunked path computes in float32 (loss measured ~1e-7: tolerance 1e-5).
SATURATED_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 5e-3)}


@pytest.mark.parametrize("temperature", [0.05, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saturated_pairs_match_float64(dtype, temperature):
    """Near-duplicate views (N = 256, d = 128): at tau = 0.05 the loss is ~5e-6 and 1 - p_pos ~1e-5, so the
    gradient rests on 1 - p_pos. It must keep float32's relative precision: the positive term is exact
    (r = neg e^{-t}, 1 - p_pos = r / (1 + r)), never 1 minus a probability."""
    z1, z2 = near_duplicate_views(256, 128, dtype, seed=int(100 * temperature))
    r1, r2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    reference = nt_xent_reference(r1, r2, temperature)
    grads_ref = torch.autograd.grad(reference * 3.0, [r1, r2])  # a non-unit upstream gradient
    a, b = (z.to(dtype).requires_grad_() for z in (z1, z2))
    loss = nt_xent(a, b, temperature, backend="chunked")
    grads = torch.autograd.grad(loss * 3.0, [a, b])
    tol_loss, tol_grad = SATURATED_TOL[dtype]
    if temperature == 0.05:
        assert reference.item() < 1e-4  # the regime this test is about
    assert relative_error(loss.detach(), reference) < tol_loss
    for got, want in zip(grads, grads_ref):
        assert got.dtype == dtype
        assert relative_error(got, want) < tol_grad


def test_temperature_near_the_floor_stays_finite_and_exact():
    """tau = MIN_TEMPERATURE = 0.03: exp(+-2/tau) ~ 1e+-29 stays inside float32's range. Random rows (the
    untrained start: every E ~ e^{-1/tau}) and opposite views (each positive at s ~ -1, the negatives
    close: r ~ e^{2/tau}, loss ~ 2/tau) both keep float32 precision."""
    gen = torch.Generator().manual_seed(5)
    random_rows = torch.randn(64, 32, generator=gen, dtype=torch.float64)
    direction = torch.randn(1, 32, generator=gen, dtype=torch.float64)
    near = direction + 0.01 * torch.randn(8, 32, generator=gen, dtype=torch.float64)
    for z1, z2 in [(random_rows[:32], random_rows[32:]), (near[:4], -near[4:])]:
        r1, r2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        reference = nt_xent_reference(r1, r2, ntxent.MIN_TEMPERATURE)
        grads_ref = torch.autograd.grad(reference, [r1, r2])
        a, b = (z.float().requires_grad_() for z in (z1, z2))
        loss = nt_xent(a, b, ntxent.MIN_TEMPERATURE)
        grads = torch.autograd.grad(loss, [a, b])
        assert relative_error(loss.detach(), reference) < 1e-5
        for got, want in zip(grads, grads_ref):
            # 1e-4: with opposite views the gradient is the small part of each row orthogonal to itself, and
            # float32's normalisation backward cancels (eager float32 autograd of the reference: ~1e-5 too)
            assert torch.isfinite(got).all() and relative_error(got, want) < 1e-4


def test_projection_head_under_bf16_autocast_gives_16_bit_projections():
    """The head ends in BatchNorm1d; under CPU bf16 autocast its output is bfloat16, and the loss takes it as it
    is (no float32 copy needed from the caller) and returns bfloat16 gradients."""
    from simclr_dali.model.simclr import ProjectionHead

    torch.manual_seed(0)
    head = ProjectionHead(32, 64, 16)
    x = torch.randn(20, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = head(x)
        z1, z2 = z.chunk(2)
        loss = nt_xent(z1, z2, 0.1)
    assert z.dtype == torch.bfloat16 and loss.dtype == torch.float32
    z1.retain_grad()
    loss.backward()
    assert z1.grad.dtype == torch.bfloat16 and torch.isfinite(z1.grad).all()
    # the enclosing autocast changes nothing inside the loss (its products stay float32 on this path)
    plain = nt_xent(z1.detach(), z2.detach(), 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(nt_xent(z1.detach(), z2.detach(), 0.1), plain)


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
    assert sizes and max(sizes) <= ntxent_chunked.CHUNK_BYTES


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="two \\(N, d\\) tensors"):
        nt_xent(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 8), torch.randn(4, 8), temperature=0.001)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 8), torch.randn(4, 8), temperature=0.029)
    with pytest.raises(ValueError, match="float32_matmul_precision"):
        nt_xent(torch.randn(4, 8), torch.randn(4, 8), float32_matmul_precision="bf16")


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


@pytest.mark.slow
def test_two_processes_match_single_process_global_batch():
    torch.manual_seed(3)
    world, n, d, temperature = 2, 6, 5, 0.2
    z1_all = torch.randn(world * n, d, dtype=torch.float64)
    z2_all = torch.randn(world * n, d, dtype=torch.float64)
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.start_processes(
        _rank_worker,
        args=(world, _free_port(), z1_all, z2_all, temperature, out),
        nprocs=world,
        start_method="spawn",
    )

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

    rows = torch.cat(
        [torch.cat([z1[r * n : (r + 1) * n], z2[r * n : (r + 1) * n]]) for r in range(world)]
    )
    rows = F.normalize(rows, dim=1)
    logits = rows @ rows.T / temperature
    logits = logits.masked_fill(torch.eye(len(rows), dtype=torch.bool), float("-inf"))
    local = torch.arange(2 * n)
    targets = torch.cat([r * 2 * n + (local + n) % (2 * n) for r in range(world)])
    return F.cross_entropy(logits, targets)


# ---------------------------------------------------------------- the loss benchmark's counts (bench.py loss)


def test_loss_bench_counts_each_paths_real_work():
    """Floors come from each path's own operation count: 3 products of 2 (2N)^2 d for the materialising and
    chunked paths; the fused backward recomputes its scores (and their exps) once per d slice of its grid."""
    from simclr_dali.bench.loss import floor, work

    pairs = 8192**2
    assert work("compiled", 8192, 128, "bfloat16")["matmul_flops"] == 6 * pairs * 128
    one_slice = work("fused", 8192, 128, "bfloat16")
    assert one_slice["matmul_flops"] == 6 * pairs * 128 and one_slice["exps"] == 2 * pairs
    two_slices = work("fused", 8192, 256, "bfloat16")  # d = 256 in two 128-wide output slices
    assert two_slices["matmul_flops"] == 8 * pairs * 256 and two_slices["exps"] == 3 * pairs
    assert work("fused_tf32", 8192, 128, "float32")["matmul_unit"] == "tf32 tensor cores"
    assert work("fused", 8192, 128, "float32")["matmul_unit"] == "fp32 FMA"
    estimate = floor("fused", 8192, 128, "bfloat16")
    assert (
        estimate["floor_ms"]
        == max(estimate["matmul_ms"], estimate["exp_ms"], estimate["bytes_ms"])
        > 0
    )


def test_loss_bench_measures_time_memory_and_error():
    """One configuration as `bench.py loss` runs it on the CPU: in a child process (it retunes glibc malloc)."""
    from simclr_dali.bench.loss import _measure_subprocess

    config = dict(
        method="chunked", two_n=64, d=16, dtype="float32", device="cpu", repeats=1, check_max=64
    )
    result = _measure_subprocess(config, timeout_s=120)
    assert "reason" not in result, result
    assert result["time_ms"] > 0 and result["peak_extra_bytes"] >= 0
    assert result["rel_err_loss"] < 1e-5 and result["rel_err_grad"] < 1e-5

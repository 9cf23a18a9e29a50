"""Property checks of nt_xent shared by both backends' tests (tests/test_ntxent.py in process for the chunked
path, tests/test_ntxent_triton.py's child process for the Triton kernels under the interpreter).

Inputs that break a loss written for unit rows: zero rows, rows of norm <= 1e-12 (divided by eps, not by their
norm), norms from 1e-30 to 1e30 (their squares leave float32's range), all-zero (collapsed) batches, identical
views, d = 1. The oracle is ``nt_xent_reference`` in float64 on the same values, itself checked against
``independent_loss_and_grads`` (numpy, math.hypot norms, a dense softmax and its textbook gradient)."""

from __future__ import annotations

import math

import numpy as np
import torch

NORM_EPS = 1e-12


def independent_loss_and_grads(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, grad_loss: float = 1.0
):
    """(loss, dz1, dz2) in float64 from the definitions, sharing no code with model/ntxent.py: rows
    x / max(||x||, eps) with ||x|| from math.hypot (no overflow), the dense logits, a max-shifted log-sum-exp,
    and the gradient dL/ds_kj = (p_kj - [j = pos(k)]) / M pushed through the logits and the normalisation."""
    x = torch.cat([z1, z2]).detach().double().numpy()
    m, n = x.shape[0], x.shape[0] // 2
    norms = np.array([math.hypot(*row) for row in x])
    u = x / np.maximum(norms, NORM_EPS)[:, None]
    logits = u @ u.T / temperature
    np.fill_diagonal(logits, -np.inf)
    positives = (np.arange(m) + n) % m
    shift = logits.max(1, keepdims=True)
    weights = np.exp(logits - shift)
    lse = shift[:, 0] + np.log(weights.sum(1))
    loss = float(np.mean(lse - logits[np.arange(m), positives]))
    probs = weights / weights.sum(1, keepdims=True)
    d_logits = probs.copy()
    d_logits[np.arange(m), positives] -= 1.0
    d_logits *= grad_loss / m
    d_u = (d_logits + d_logits.T) @ u / temperature
    unclamped = norms > NORM_EPS
    projected = np.where(unclamped[:, None], d_u - u * (u * d_u).sum(1, keepdims=True), d_u)
    d_x = projected / np.maximum(norms, NORM_EPS)[:, None]
    return loss, torch.from_numpy(d_x[:n]), torch.from_numpy(d_x[n:])


def adversarial_batches(dtype: torch.dtype, seed: int, sizes=((1, 1), (3, 5), (9, 20), (12, 40))):
    """(name, z1, z2) float64 tensors holding ``dtype``-representable values (the reference sees exactly what the
    loss sees). Per size: rows of norms 10^U(-30, 30) (float64: also 10^U(-300, 300)) with zero rows and rows of
    norm <= 1e-12 among them; the same with identical views; an all-zero batch; a zero row whose positive is
    zero too."""
    gen = torch.Generator().manual_seed(seed)
    exponent_range = 300 if dtype == torch.float64 else 30
    for n, d in sizes:
        directions = [torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(2)]
        norms = [
            10.0 ** ((torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * exponent_range)
            for _ in range(2)
        ]
        if n >= 3:
            norms[0][0] = 0.0
            norms[1][1] = 1e-13  # clamped, not zero: divided by eps, a row of norm 0.1
            norms[0][2] = (
                2e-12  # just above the clamp (at it the gradient has a kink: both sides are right)
            )
        if n >= 9:
            norms[1][3] = 0.0
            norms[0][4], norms[1][4] = 1e30, 1e-30  # a positive pair 60 orders of magnitude apart
            norms[0][5] = norms[1][5] = 1.0
        z1, z2 = (
            direction / direction.norm(dim=1, keepdim=True) * norm[:, None]
            for direction, norm in zip(directions, norms)
        )
        z1, z2 = z1.to(dtype).double(), z2.to(dtype).double()
        yield f"norms N={n} d={d}", z1, z2
        yield f"identical views N={n} d={d}", z1, z1.clone()
        yield (
            f"all zero N={n} d={d}",
            torch.zeros(n, d, dtype=torch.float64),
            torch.zeros(n, d, dtype=torch.float64),
        )
        if n >= 3:
            both_zero = z2.clone()
            both_zero[0] = 0.0
            yield f"zero pair N={n} d={d}", z1, both_zero


def gradient_scales(z: torch.Tensor, temperature: float, grad_loss: float) -> torch.Tensor:
    """(N,) the natural size of each row's input gradient, grad_loss / (2N tau max(||x||, eps)) (each anchor's
    weights sum to O(1)): the floor of the relative comparison, for rows whose exact gradient is 0 (identical
    views whose negatives are all zero rows), where both sides hold only rounding noise of that size."""
    norms = torch.tensor([math.hypot(*row) for row in z.double().tolist()], dtype=torch.float64)
    return grad_loss / (2 * z.shape[0] * temperature * norms.clamp_min(NORM_EPS))


def row_relative_errors(got: torch.Tensor, want: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Per row ||got - want|| / max(||want||, floor): each row's gradient scales as 1 / its norm, so a
    tensor-wide norm would hide the rows of norm 1e30. NaN anywhere gives NaN (a failed comparison)."""
    diff = (got.double() - want.double()).norm(dim=1)
    return diff / torch.maximum(want.double().norm(dim=1), floor)


def check_against_reference(
    nt_xent, nt_xent_reference, dtype, seeds, tol, device="cpu", log=print, **kwargs
):
    """nt_xent(**kwargs) on ``dtype`` inputs against nt_xent_reference in float64 on the same values: the loss and
    each row of both gradients within ``tol`` (relative); all-zero batches give log(2N - 1). Returns the worst."""
    worst = 0.0
    temperature = 0.1
    for seed in seeds:
        for name, z1, z2 in adversarial_batches(dtype, seed):
            r1, r2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
            ref = nt_xent_reference(r1, r2, temperature)
            ref_grads = torch.autograd.grad(ref * 3.0, [r1, r2])  # a non-unit upstream gradient
            a1, a2 = (
                z.to(device=device, dtype=dtype, copy=True).requires_grad_() for z in (z1, z2)
            )
            loss = nt_xent(a1, a2, temperature, **kwargs)
            grads = torch.autograd.grad(loss * 3.0, [a1, a2])
            loss_err = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-300)
            if ref.item() == 0.0:  # N = 1: the only other row is the positive, the loss is log 1
                loss_err = abs(loss.item())
            floors = [gradient_scales(z, temperature, 3.0) for z in (z1, z2)]
            grad_err = max(
                row_relative_errors(g.cpu(), r, f).max().item()
                for g, r, f in zip(grads, ref_grads, floors)
            )
            if name.startswith("all zero"):  # every logit 0: the positive is one of 2N - 1 equals
                expected = math.log(2 * z1.shape[0] - 1)
                assert abs(loss.item() - expected) <= tol * max(expected, 1.0), (
                    name,
                    loss.item(),
                    expected,
                )
            worst = max(worst, loss_err, grad_err)
            log(
                f"{str(dtype):14s} seed {seed} {name:28s} loss {ref.item():9.5f} "
                f"rel err loss {loss_err:.1e} grads {grad_err:.1e}"
            )
            assert loss_err <= tol and grad_err <= tol, (name, seed, loss_err, grad_err)
            assert all(g.dtype == dtype for g in grads)
    return worst


def check_non_finite_propagates(nt_xent, device="cpu", **kwargs):
    """A NaN or an inf entry anywhere makes the loss NaN and the gradients NaN (no exception: checking would
    need a host sync per step), on every backend alike."""
    for bad in (float("nan"), float("inf"), -float("inf")):
        z1, z2 = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
        z2[1, 3] = bad
        a1, a2 = (z.float().to(device).requires_grad_() for z in (z1, z2))
        loss = nt_xent(a1, a2, 0.1, **kwargs)
        loss.backward()
        assert torch.isnan(loss).item(), (bad, loss)
        assert torch.isnan(a1.grad).any().item() and torch.isnan(a2.grad).any().item(), bad


def check_rejections(nt_xent, backends=("chunked", "triton")):
    """d = 0 and non-float inputs raise the same ValueError whichever backend is asked for."""
    import pytest

    messages = {}
    for backend in backends:
        for name, z in (("d=0", torch.zeros(4, 0)), ("int64", torch.ones(4, 8, dtype=torch.int64))):
            with pytest.raises(ValueError) as raised:
                nt_xent(z, z, 0.1, backend=backend)
            messages.setdefault(name, set()).add(str(raised.value))
    assert all(len(found) == 1 for found in messages.values()), messages
    assert "d >= 1" in next(iter(messages["d=0"])) and "torch.int64" in next(
        iter(messages["int64"])
    )

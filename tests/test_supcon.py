"""SupCon (model/supcon.py through ``nt_xent(..., labels=...)``) against the official formulation and float64.

The peer: HobbitLong/SupContrast ``losses.py`` ``SupConLoss`` (contrast_mode 'all'), re-stated below as
``official_supcon`` in float64 (the mask of same-label pairs over the (V N) x (V N) logits, the max-shift,
the 1e-9 in the log, the mean over positives, the temperature / base_temperature factor; base_temperature =
tau makes that factor 1). Both backends: the chunked one in this process, the fused Triton kernels under the
interpreter in a fresh process (this file re-run as a script with TRITON_INTERPRET=1, as
tests/test_ntxent_triton.py does). Batches: random labels over few classes, all labels distinct (then it is
NT-Xent), one class for all, one-sample classes beside large ones, zero rows; 2 gloo processes against one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def official_supcon(
    features: torch.Tensor, labels: torch.Tensor, temperature: float, base_temperature: float
):
    """SupConLoss.forward (contrast_mode 'all') of HobbitLong/SupContrast, restated: features (bsz, n_views, d)
    already L2-normalised, labels (bsz,)."""
    bsz, views = features.shape[:2]
    same = (labels[:, None] == labels[None, :]).to(features.dtype).repeat(views, views)
    contrast = torch.cat(
        torch.unbind(features, dim=1), dim=0
    )  # view-major: all first views, then the second
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    not_self = 1.0 - torch.eye(bsz * views, dtype=features.dtype)
    positives = same * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True) + 1e-9)
    mean_log_prob_pos = (positives * log_prob).sum(1) / positives.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).view(views, bsz).mean()


def label_cases(n: int, seed: int) -> list[tuple[str, torch.Tensor, list[int]]]:
    """(name, labels (n,), rows to zero in [z1; z2]): the classes a batch can have."""
    g = torch.Generator().manual_seed(seed)
    one_sample = torch.randint(0, 3, (n,), generator=g)
    one_sample[: n // 3] = torch.arange(
        10, 10 + n // 3
    )  # a third of the samples alone in their class
    return [
        ("few classes", torch.randint(0, 4, (n,), generator=g), []),
        ("all distinct", torch.randperm(n, generator=g) * 7 - 5, []),
        ("one class", torch.full((n,), 3), []),
        ("one-sample classes", one_sample, []),
        ("zero rows", torch.randint(0, 3, (n,), generator=g), [0, n + 1, 2]),
        ("large label values", torch.randint(0, 3, (n,), generator=g) * 10**12, []),
    ]


def batch(n: int, d: int, zero_rows: list[int], dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * n, d, generator=g, dtype=torch.float64) * torch.rand(
        2 * n, 1, generator=g, dtype=torch.float64
    )
    z[zero_rows] = 0.0
    return z[:n].to(dtype), z[n:].to(dtype)


def loss_and_grads(fn, z1, z2, *args, **kwargs):
    a, b = (z.detach().clone().requires_grad_() for z in (z1, z2))
    loss = fn(a, b, *args, **kwargs)
    ga, gb = torch.autograd.grad(loss * 3.0, [a, b])
    return loss.detach(), torch.cat([ga, gb])


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def check_backend(backend: str, seeds=range(3)) -> float:
    """Loss and gradients of ``nt_xent(labels=...)`` on ``backend`` against the official formulation (to 1e-7:
    its log's 1e-9 epsilon) and the exact float64 reference (float64 inputs to 1e-10, float32 inputs to 1e-6
    relative); returns the worst float32 error."""
    import torch.nn.functional as F

    from simclr_dali.model.ntxent import nt_xent
    from simclr_dali.model.supcon import supcon_reference

    worst = 0.0
    for seed in seeds:
        for n, d in [(6, 5), (17, 8)]:
            for name, labels, zero_rows in label_cases(n, seed):

                def official(a, b, labels=labels):
                    features = torch.stack([F.normalize(a, dim=1), F.normalize(b, dim=1)], dim=1)
                    return official_supcon(features, labels, 0.2, base_temperature=0.2)

                z1, z2 = batch(n, d, zero_rows, torch.float64, seed)
                want_loss, want_grad = loss_and_grads(supcon_reference, z1, z2, labels, 0.2)
                peer_loss, peer_grad = loss_and_grads(official, z1, z2)
                for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-6)]:
                    a, b = z1.to(dtype), z2.to(dtype)
                    loss, grad = loss_and_grads(nt_xent, a, b, 0.2, backend, labels=labels)
                    errors = relative(loss, want_loss), relative(grad, want_grad)
                    assert max(errors) <= tol, (backend, name, n, dtype, seed, errors)
                    peer_errors = relative(loss, peer_loss), relative(grad, peer_grad)
                    assert max(peer_errors) <= max(tol, 1e-7), (
                        backend,
                        name,
                        n,
                        dtype,
                        seed,
                        peer_errors,
                    )
                    if dtype == torch.float32:
                        worst = max(worst, *errors)
    return worst


def test_reference_is_the_official_formulation_and_ntxent_for_distinct_labels():
    import torch.nn.functional as F

    from simclr_dali.model.ntxent import nt_xent_reference
    from simclr_dali.model.supcon import supcon_reference

    for name, labels, zero_rows in label_cases(9, 0):
        z1, z2 = batch(9, 4, zero_rows, torch.float64, 1)
        features = torch.stack([F.normalize(z1, dim=1), F.normalize(z2, dim=1)], dim=1)
        official = official_supcon(features, labels, 0.1, 0.1)
        assert supcon_reference(z1, z2, labels, 0.1).item() == pytest.approx(
            official.item(), rel=1e-8
        ), name
        if name == "all distinct":
            assert official.item() == pytest.approx(nt_xent_reference(z1, z2, 0.1).item(), rel=1e-8)


def test_chunked_matches_the_official_supcon():
    print(f"chunked float32 worst relative error {check_backend('chunked'):.1e}")


def test_supcon_differs_from_ntxent_and_checks_labels():
    from simclr_dali.model.ntxent import nt_xent

    z1, z2 = batch(8, 4, [], torch.float64, 0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert abs(nt_xent(z1, z2, 0.2, labels=labels).item() - nt_xent(z1, z2, 0.2).item()) > 1e-3
    with pytest.raises(ValueError, match="one label per pair"):
        nt_xent(z1, z2, 0.2, labels=labels[:5])
    with pytest.raises(ValueError, match="integer"):
        nt_xent(z1, z2, 0.2, labels=labels.double())


def test_triton_backend_matches_the_official_supcon():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, __file__, "triton"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "triton float32 worst" in proc.stdout


# ---------------------------------------------------------------- 2 gloo processes against one


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _layer_loss(z1, z2, labels, temperature):
    """A shared linear layer stands in for the network: its gradient is what DDP averages."""
    from simclr_dali.model.ntxent import nt_xent

    torch.manual_seed(0)
    layer = torch.nn.Linear(z1.shape[1], 8, dtype=torch.float64)
    loss = nt_xent(layer(z1), layer(z2), temperature, "chunked", labels=labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in layer.parameters()]


def _rank_worker(rank, world, port, z1_all, z2_all, labels_all, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = z1_all.shape[0] // world
        part = slice(rank * n, (rank + 1) * n)
        loss, grads = _layer_loss(z1_all[part], z2_all[part], labels_all[part], 0.2)
        for g in grads:
            dist.all_reduce(g)
            g /= world
        out[rank] = (loss, grads)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process():
    """Labels travel with the rows: rank r holds pairs r n .. (r + 1) n - 1; classes span both ranks, one class
    lives on one rank only, one sample is alone in its class. Mean of the ranks' losses and the averaged
    gradient equal one process's on the whole batch to 1e-10."""
    import torch.multiprocessing as mp

    world, n, d = 2, 6, 5
    z1_all, z2_all = batch(world * n, d, [3], torch.float64, 4)
    labels_all = torch.tensor([0, 1, 1, 2, 2, 2, 0, 1, 5, 5, 7, 0])
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    args = (world, _free_port(), z1_all, z2_all, labels_all, out)
    mp.start_processes(_rank_worker, args=args, nprocs=world, start_method="spawn")
    # one process, rows ordered as the ranks hold them (the loss does not depend on the pairs' order)
    loss, expected = _layer_loss(z1_all, z2_all, labels_all, 0.2)
    assert (out[0][0] + out[1][0]).item() / 2 == pytest.approx(loss.item(), rel=1e-10)
    for rank in range(world):
        for got, want in zip(out[rank][1], expected):
            assert relative(got, want) < 1e-10


if __name__ == "__main__" and sys.argv[1:] == ["triton"]:
    print(f"triton float32 worst relative error {check_backend('triton', seeds=range(1)):.1e}")

"""The SimCLR training step: the one place where a batch of two views becomes an optimiser update. train.py,
``bench.py train|profile`` and the distributed tests all call ``train_step``.

Each stage runs inside a ``torch.profiler.record_function`` range of its name, so a profiler trace
(``bench.py profile``) attributes the step's time; outside a profiler the ranges cost a few microseconds.
A plain step: forward, loss, backward, optimizer. With micro-batches (``micro_batch``, gradient caching,
trainer/gradcache.py): "forward (no grad)" once per micro-batch, loss (with dL/dz), "forward + backward
(micro-batch)" once per micro-batch, optimizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from ..model.ntxent import nt_xent
from .config import TrainConfig
from .gradcache import cached_forward_backward, resolve_micro_batch


@dataclass
class StepOutput:
    """What a step hands back to the loop's meters: the loss and the two views' projections, detached."""

    loss: torch.Tensor  # scalar, this process's loss (the mean over its anchors)
    z1: torch.Tensor  # (N, proj_dim)
    z2: torch.Tensor  # (N, proj_dim)


def contrastive_loss(
    z: torch.Tensor, cfg: TrainConfig, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z (2N, d) = [view1's projections; view2's] -> (NT-Xent over every process's views, z1, z2 (N, d)); with
    ``cfg.loss`` supcon, SupCon with the pairs' ``labels`` (N,). The projections stay as the head made them
    (16-bit under bf16/fp16 autocast: the fused kernels' tensor-core operands); the loss keeps its statistics
    in float32 and runs outside autocast."""
    z1, z2 = z.chunk(2)
    if cfg.loss == "supcon" and labels is None:
        raise ValueError(
            "loss supcon needs the pairs' labels: build the loader with LabelledTwoViews"
        )
    loss = nt_xent(
        z1,
        z2,
        cfg.temperature,
        backend=cfg.loss_backend,
        labels=labels if cfg.loss == "supcon" else None,
        float32_matmul_precision=cfg.loss_float32_matmul_precision,
    )
    return loss, z1, z2


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    view1: torch.Tensor,
    view2: torch.Tensor,
    cfg: TrainConfig,
    accelerator,
    labels: torch.Tensor | None = None,
    *,
    probe=None,
) -> StepOutput:
    """One optimiser update on a batch of ``(view1, view2)`` (N, 3, S, S) each.

    Plain (``cfg.micro_batch`` off, or >= N): both views go through the model as one batch of 2N (BN
    statistics over 2N, as the paper), under the accelerator's autocast, then the loss and its backward.
    With micro-batches of M < N images per view: the same loss and the exact gradient of the whole batch
    by gradient caching, with at most 2M images under autograd at a time and BN statistics per micro-batch
    (trainer/gradcache.py).

    ``labels`` (N,): the pairs' classes, for SupCon and the online probe (``probe``: trainer/online_probe.py's
    OnlineProbe, updated on the detached backbone features after the backward; plain steps only)."""
    micro_batch = resolve_micro_batch(cfg.micro_batch, model, view1, view2, optimizer, accelerator)
    if micro_batch:
        loss, z1, z2 = cached_forward_backward(
            model,
            view1,
            view2,
            micro_batch,
            lambda z: contrastive_loss(z, cfg, labels),
            accelerator,
        )
    else:
        with record_function("forward"), accelerator.autocast():
            h, z = model(torch.cat([view1, view2]))
        with record_function("loss"):
            loss, z1, z2 = contrastive_loss(z, cfg, labels)
        with record_function("backward"):
            accelerator.backward(loss)
        if probe is not None and labels is not None:
            with record_function("online probe"):
                probe.update(h, labels)
    with record_function("optimizer"):
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return StepOutput(loss.detach(), z1.detach(), z2.detach())

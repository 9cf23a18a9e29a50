"""The SimCLR training step: the one place where a batch of two views becomes an optimiser update. train.py,
``bench.py train|profile`` and the distributed tests all call ``train_step``.

Each stage runs inside a ``torch.profiler.record_function`` range of its name (forward, loss, backward,
optimizer), so a profiler trace (``bench.py profile``) attributes the step's time; outside a profiler the
ranges cost a few microseconds."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from model.ntxent import nt_xent

from .config import TrainConfig


@dataclass
class StepOutput:
    """What a step hands back to the loop's meters: the loss and the two views' projections, detached."""

    loss: torch.Tensor  # scalar, this process's loss (the mean over its anchors)
    z1: torch.Tensor  # (N, proj_dim)
    z2: torch.Tensor  # (N, proj_dim)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, view1: torch.Tensor, view2: torch.Tensor,
               cfg: TrainConfig, accelerator) -> StepOutput:
    """One optimiser update on a batch of ``(view1, view2)`` (N, 3, S, S) each.

    Both views go through the model as one batch of 2N (BN statistics over 2N, as the paper), under the
    accelerator's autocast; the loss (NT-Xent over every process's views) is computed outside autocast, in
    the accumulation precision of its own kernels."""
    with record_function("forward"), accelerator.autocast():
        _, z = model(torch.cat([view1, view2]))
    with record_function("loss"):
        z1, z2 = z.chunk(2)  # as the head made them: 16-bit under bf16/fp16 autocast (the loss's tensor cores)
        loss = nt_xent(z1, z2, cfg.temperature, backend=cfg.loss_backend, float32_matmul_precision=cfg.loss_float32_matmul_precision)
    with record_function("backward"):
        accelerator.backward(loss)
    with record_function("optimizer"):
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return StepOutput(loss.detach(), z1.detach(), z2.detach())

"""Optimisers and learning-rate schedules, in one place: pretraining's (timm's LARS with warm-up + cosine)
and the evaluation protocols' (SGD with Nesterov momentum + cosine)."""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from .config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimiser (LARS by default): biases and normalisation parameters get no weight decay and,
    for LARS, no trust-ratio adaptation (timm's param groups + ``always_adapt=False``)."""
    return create_optimizer_v2(
        model, cfg.optimizer, lr=cfg.scaled_lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> CosineLRScheduler:
    """Linear warm-up from 0, then cosine decay to 0, per step (timm's scheduler)."""
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup_steps),
        warmup_t=warmup_steps,
        warmup_prefix=True,
        warmup_lr_init=0.0,
        lr_min=0.0,
        t_in_epochs=False,
    )


def sgd_cosine(
    parameters, base_lr: float, batch_size: int, steps: int, momentum: float = 0.9, weight_decay: float = 0.0
):
    """The evaluation protocols' optimiser: SGD with Nesterov momentum at ``base_lr x batch_size / 256``,
    cosine over ``steps`` (no warm-up)."""
    optimizer = torch.optim.SGD(
        parameters, lr=base_lr * batch_size / 256, momentum=momentum, nesterov=True, weight_decay=weight_decay
    )
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))

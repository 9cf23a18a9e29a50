"""Pretraining's optimiser and learning-rate schedule: timm's LARS with linear warm-up + cosine (the evaluation
protocols' SGD lives in evaluation/optim.py, so that evaluation never imports the trainer)."""

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


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> CosineLRScheduler:
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

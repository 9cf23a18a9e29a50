"""Model, optimiser, schedule and the training step, built from a TrainConfig: what train.py wires
together (and what the distributed tests exercise with fixed inputs)."""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from model.ntxent import nt_xent
from model.simclr import SimCLR

from .config import TrainConfig
from .global_bn import convert_to_global_bn


def build_model(cfg: TrainConfig, device_type: str, world_size: int) -> SimCLR:
    """SimCLR with global BN across processes (when asked and world > 1), channels-last if asked."""
    model = SimCLR(cfg.backbone, cfg.proj_hidden or None, cfg.proj_dim, cifar_stem=cfg.cifar_stem, **cfg.timm_kwargs)
    if world_size > 1 and cfg.sync_bn:
        model = convert_to_global_bn(model, device_type)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimiser (LARS by default): biases and normalisation parameters get no weight decay and,
    for LARS, no trust-ratio adaptation (timm's param groups + ``always_adapt=False``)."""
    return create_optimizer_v2(model, cfg.optimizer, lr=cfg.scaled_lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> CosineLRScheduler:
    """Linear warm-up from 0, then cosine decay to 0, per step (timm's scheduler)."""
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps), warmup_t=warmup_steps, warmup_prefix=True,
                             warmup_lr_init=0.0, lr_min=0.0, t_in_epochs=False)


def simclr_loss(forward, view1: torch.Tensor, view2: torch.Tensor, cfg: TrainConfig):
    """Both views through the model as one batch (BN statistics over 2N, as the paper), then NT-Xent.
    Returns (loss, z1, z2); call inside the accelerator's autocast."""
    _, z = forward(torch.cat([view1, view2]))
    z1, z2 = z.float().chunk(2)
    return nt_xent(z1, z2, cfg.temperature, backend=cfg.loss_backend), z1, z2

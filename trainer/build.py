"""The model of a training run, built from its TrainConfig (what train.py, the benchmarks and the
distributed tests share)."""

from __future__ import annotations

import torch

from model.simclr import SimCLR

from .config import TrainConfig
from .global_bn import convert_to_global_bn


def build_model(cfg: TrainConfig, device_type: str, world_size: int) -> SimCLR:
    """SimCLR with global BN across processes (when asked and world > 1), channels-last if asked."""
    model = SimCLR(cfg.backbone, cfg.proj_hidden, cfg.proj_dim, pretrained=cfg.pretrained, cifar_stem=cfg.cifar_stem, **cfg.timm_kwargs)
    if world_size > 1 and cfg.sync_bn:
        model = convert_to_global_bn(model, device_type)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model

"""The loaders a training run reads, built from its TrainConfig: one factory for train.py, the benchmarks
and the tests (so that every feed sees the same augmentations and the same sharding)."""

from __future__ import annotations

import os

import torch

from ..pipeline.augment import AugmentConfig
from ..pipeline.loader import DaliLoader, EvalView, LabelledTwoViews, TwoViews, default_num_threads
from ..pipeline.torchvision_baseline import TorchvisionPretrainLoader
from .config import TrainConfig


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    """The SimCLR view of ``cfg``: its ``augment`` section, the preset's values already filled in."""
    return cfg.augment


def data_device(cfg: TrainConfig, device: torch.device) -> str:
    """'gpu' or 'cpu': where DALI decodes and augments for a run on ``device``."""
    where = cfg.loader.device
    return "gpu" if where == "gpu" or (where == "auto" and device.type == "cuda") else "cpu"


def _threads(cfg: TrainConfig, where: str = "cpu") -> int:
    local_processes = int(
        os.environ.get("LOCAL_WORLD_SIZE", 1)
    )  # set by accelerate launch / torchrun
    return cfg.loader.threads or default_num_threads(local_processes, where)


def build_train_loader(
    cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1, loader: str | None = None
):
    """Two SimCLR views per image, ``cfg.batch_size / world`` images per batch, this rank's part of the shards.

    ``loader``: 'dali' (default: ``cfg.loader.kind``) or 'torchvision' (the baseline DataLoader)."""
    augment, local_batch = augment_config(cfg), cfg.batch_size // world
    if (loader or cfg.loader.kind) == "torchvision":
        return TorchvisionPretrainLoader(
            cfg.train_shards,
            local_batch,
            augment,
            device=str(device),
            shard_id=rank,
            num_shards=world,
            seed=cfg.seed,
            shuffle_buffer=cfg.loader.shuffle_buffer,
            num_workers=_threads(cfg),
        )
    where = data_device(cfg, device)
    from .online_probe import (
        wants_labels,
    )  # issue 31: SupCon and the online probe read the labels too

    return DaliLoader(
        cfg.train_shards,
        local_batch,
        (LabelledTwoViews if wants_labels(cfg) else TwoViews)(augment),
        train=True,
        device=where,
        device_id=device.index if where == "gpu" else None,
        shard_id=rank,
        num_shards=world,
        seed=cfg.seed,
        num_threads=_threads(cfg, where),
        prefetch=cfg.loader.prefetch,
        shuffle_buffer=cfg.loader.shuffle_buffer,
        dtype=torch.float16 if where == "gpu" else torch.float32,
        max_image_pixels=cfg.loader.max_image_pixels,
        hw_decoder_load=cfg.loader.hw_decoder_load,
        cache_bytes=cfg.loader.shard_cache_mb << 20,  # issue 28: s3:// shards only
        in_flight=cfg.loader.shard_fetches,
    )


def build_eval_loaders(
    cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1
) -> tuple[DaliLoader, DaliLoader] | None:
    """(train, val) evaluation loaders of the in-training probe, or None when ``cfg`` evaluates nothing."""
    if not cfg.eval_every_epochs:
        return None
    where = data_device(cfg, device)
    view = EvalView(cfg.eval_size or cfg.augment.size, cfg.eval_resize)
    return tuple(
        DaliLoader(
            shards,
            256,
            view,
            train=False,
            device=where,
            device_id=device.index if where == "gpu" else None,
            shard_id=rank,
            num_shards=world,
            num_threads=_threads(cfg, where),
            max_image_pixels=cfg.loader.max_image_pixels,
        )
        for shards in (cfg.eval_train_shards, cfg.eval_val_shards)
    )

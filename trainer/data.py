"""The loaders a training run reads, built from its TrainConfig: one factory for train.py, the benchmarks
and the tests (so that every feed sees the same augmentations and the same sharding)."""

from __future__ import annotations

import os

import torch

from ..pipeline.augment import AugmentConfig
from ..pipeline.loader import DaliLoader, EvalView, TwoViews, default_num_threads
from ..pipeline.torchvision_baseline import TorchvisionPretrainLoader
from .config import TrainConfig


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    """The SimCLR view of ``cfg``: its preset with the size, crop, jitter and blur fields applied."""
    preset = AugmentConfig.cifar if cfg.augment == "cifar" else AugmentConfig
    overrides = {
        "size": cfg.image_size,
        "crop_area": (cfg.min_crop_area, 1.0),
        "contrast_per_channel": cfg.contrast_per_channel,
        "brightness_impl": cfg.brightness_impl,
        "crop_sampler": cfg.crop_sampler,
        "roi_decode": cfg.roi_decode,
        "blur_padding": cfg.blur_padding,
    }
    if cfg.jitter_strength is not None:
        overrides["jitter_strength"] = cfg.jitter_strength
    if cfg.blur_prob is not None:
        overrides["blur_prob"] = cfg.blur_prob
    return preset(**overrides)


def data_device(cfg: TrainConfig, device: torch.device) -> str:
    """'gpu' or 'cpu': where DALI decodes and augments for a run on ``device``."""
    return "gpu" if cfg.data_device == "gpu" or (cfg.data_device == "auto" and device.type == "cuda") else "cpu"


def _threads(cfg: TrainConfig, where: str = "cpu") -> int:
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # set by accelerate launch / torchrun
    return cfg.data_threads or default_num_threads(local_processes, where)


def build_train_loader(
    cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1, loader: str | None = None
):
    """Two SimCLR views per image, ``cfg.batch_size / world`` images per batch, this rank's part of the shards.

    ``loader``: 'dali' (default: ``cfg.data_loader``) or 'torchvision' (the baseline DataLoader)."""
    augment, local_batch = augment_config(cfg), cfg.batch_size // world
    if (loader or cfg.data_loader) == "torchvision":
        return TorchvisionPretrainLoader(
            cfg.train_shards,
            local_batch,
            augment,
            device=str(device),
            shard_id=rank,
            num_shards=world,
            seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer,
            num_workers=_threads(cfg),
        )
    where = data_device(cfg, device)
    return DaliLoader(
        cfg.train_shards,
        local_batch,
        TwoViews(augment),
        train=True,
        device=where,
        device_id=device.index if where == "gpu" else None,
        shard_id=rank,
        num_shards=world,
        seed=cfg.seed,
        num_threads=_threads(cfg, where),
        prefetch=cfg.prefetch,
        shuffle_buffer=cfg.shuffle_buffer,
        dtype=torch.float16 if where == "gpu" else torch.float32,
        cache_bytes=cfg.shard_cache_mb << 20,  # issue 28: s3:// shards only
        in_flight=cfg.shard_fetches,
    )


def build_eval_loaders(
    cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1
) -> tuple[DaliLoader, DaliLoader] | None:
    """(train, val) evaluation loaders of the in-training probe, or None when ``cfg`` evaluates nothing."""
    if not cfg.eval_every_epochs:
        return None
    where = data_device(cfg, device)
    view = EvalView(cfg.eval_size or cfg.image_size, cfg.eval_resize)
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
        )
        for shards in (cfg.eval_train_shards, cfg.eval_val_shards)
    )

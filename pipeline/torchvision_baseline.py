"""The baseline the DALI pipeline is measured against: the same SimCLR views made by torchvision
transforms on PIL images, fed by a torch DataLoader over the same WebDataset shards.

Used by ``bench.py pipeline|train`` and by ``train.py --data_loader torchvision`` (time-to-accuracy
comparisons); training uses the DALI loader by default."""

from __future__ import annotations

import functools
import io
import os

import torch

from ..common.processes import die_with_parent
from .augment import AugmentConfig
from .shards.shardset import IMAGE_COMPONENTS, read_index, shard_paths


def simclr_transform(cfg: AugmentConfig):
    """torchvision's version of one SimCLR view with ``cfg``'s parameters (bicubic crop, flip, jitter
    p with strength s, grayscale p, blur p with the odd ~10% window, normalisation)."""
    import torchvision.transforms as T

    s = cfg.jitter_strength
    steps = [
        T.RandomResizedCrop(
            cfg.size,
            scale=cfg.crop_area,
            ratio=cfg.crop_aspect,
            interpolation=T.InterpolationMode.BICUBIC,
        ),
        T.RandomHorizontalFlip(cfg.flip_prob),
        T.RandomApply(
            [T.ColorJitter(cfg.brightness * s, cfg.contrast * s, cfg.saturation * s, cfg.hue * s)],
            p=cfg.jitter_prob,
        ),
        T.RandomGrayscale(cfg.gray_prob),
    ]
    if cfg.blur_prob > 0:
        steps.append(
            T.RandomApply([T.GaussianBlur(cfg.blur_window, sigma=cfg.blur_sigma)], p=cfg.blur_prob)
        )
    steps += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(steps)


class TwoViews:
    """WebDataset sample -> (view1, view2) (a picklable callable for DataLoader workers)."""

    def __init__(self, cfg: AugmentConfig):
        self.transform = simclr_transform(cfg)

    def __call__(self, sample):
        from PIL import Image

        image_key = next(k for k in IMAGE_COMPONENTS if k in sample)
        image = Image.open(io.BytesIO(sample[image_key])).convert("RGB")
        return self.transform(image), self.transform(image)


class TorchvisionPretrainLoader:
    """Same interface as ``pipeline.loader.PretrainLoader``: iterating gives one epoch of ``(view1,
    view2)`` on ``device``, channels-last; ``len()`` is steps per epoch. Samples are split across ranks
    by shard (webdataset's ``split_by_node``) and across workers by shard; shuffled in a buffer."""

    def __init__(
        self,
        shards,
        batch_size: int,
        augment: AugmentConfig = AugmentConfig(),
        *,
        device: str = "cpu",
        shard_id: int = 0,
        num_shards: int = 1,
        num_workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 4096,
    ):
        import webdataset as wds

        self.shards = shard_paths(shards)
        self.num_samples = sum(read_index(tar).num_samples for tar in self.shards)
        self.batch_size = batch_size
        self.steps = self.num_samples // (num_shards * batch_size)
        self.device = torch.device(device)
        mine = [str(p) for i, p in enumerate(self.shards) if i % num_shards == shard_id]
        dataset = (
            wds.WebDataset(mine, resampled=True, shardshuffle=False, seed=seed + shard_id)
            .shuffle(shuffle_buffer)
            .map(TwoViews(augment))
            .batched(batch_size, partial=False)
        )
        self._batches = iter(
            torch.utils.data.DataLoader(
                dataset,
                batch_size=None,
                num_workers=num_workers,
                persistent_workers=num_workers > 0,
                prefetch_factor=4 if num_workers else None,
                pin_memory=self.device.type == "cuda",
                worker_init_fn=functools.partial(
                    die_with_parent, os.getpid()
                ),  # no orphan after a SIGKILL
            )
        )

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            view1, view2 = next(self._batches)
            yield (
                view1.to(self.device, non_blocking=True).contiguous(
                    memory_format=torch.channels_last
                ),
                view2.to(self.device, non_blocking=True).contiguous(
                    memory_format=torch.channels_last
                ),
            )

    def state_dict(self) -> dict:
        """No position is kept: resuming a torchvision-fed run restarts its sample stream (not exact)."""
        return {"exact": False}

    def load_state_dict(self, state: dict) -> None:
        pass

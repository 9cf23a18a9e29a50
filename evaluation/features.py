"""Frozen-backbone features for a whole shard set, gathered from every process."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from ..pipeline.loader import DaliLoader


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module,
    loader: DaliLoader,
    accelerator: Accelerator | None = None,
    desc: str = "features",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 (N, D), labels int64 (N,)) on every process, N = every sample of the shards once.

    The backbone runs in eval mode (BN uses its running statistics); its train/eval mode is restored."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    show = progress and (accelerator is None or accelerator.is_main_process)
    for images, batch_labels in tqdm(
        loader, total=len(loader), desc=desc, unit="batch", disable=not show, leave=False
    ):
        with (
            accelerator.autocast()
            if accelerator is not None
            else torch.autocast("cpu", enabled=False)
        ):
            features.append(backbone(images).float())
        labels.append(batch_labels)
    backbone.train(was_training)
    features_local, labels_local = torch.cat(features), torch.cat(labels)
    if accelerator is None or accelerator.num_processes == 1:
        return features_local, labels_local
    # Ranks may hold different counts (the eval loader splits samples exactly): pad, gather, drop the padding.
    counts = accelerator.gather(torch.tensor([len(labels_local)], device=features_local.device))
    padded_features = accelerator.pad_across_processes(features_local, dim=0)
    padded_labels = accelerator.pad_across_processes(labels_local, dim=0)
    all_features, all_labels = (
        accelerator.gather(padded_features),
        accelerator.gather(padded_labels),
    )
    width = padded_labels.shape[0]
    keep = torch.cat(
        [
            torch.arange(int(c), device=all_labels.device) + r * width
            for r, c in enumerate(counts.tolist())
        ]
    )
    return all_features[keep], all_labels[keep]


def cached_features(
    backbone: torch.nn.Module,
    loader: DaliLoader,
    accelerator: Accelerator,
    desc: str,
    cache: Path | None,
    identity: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract_features``, saved to / reloaded from ``cache`` (a .safetensors file) when given.

    ``identity`` (the weights' sha256, the shards, the view) is stored with the features; a cache whose
    identity differs is recomputed (and overwritten), never silently reused for another backbone or data."""
    from safetensors.torch import load_file, save

    from ..common.files import atomic_write_bytes

    if cache is not None and cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as handle:
            stored = json.loads((handle.metadata() or {}).get("identity", "null"))
        if stored == identity:
            tensors = load_file(str(cache), device=str(accelerator.device))
            accelerator.print(f"{desc}: loaded from {cache}")
            return tensors["features"], tensors["labels"]
        accelerator.print(
            f"{desc}: {cache} holds features of another backbone or data set; recomputing"
        )
    features, labels = extract_features(backbone, loader, accelerator, desc)
    if cache is not None and accelerator.is_main_process:
        tensors = {"features": features.cpu().contiguous(), "labels": labels.cpu().contiguous()}
        # bytes written by atomic_write_bytes: safetensors' save_file would make the file 0600
        atomic_write_bytes(cache, save(tensors, metadata={"identity": json.dumps(identity)}))
    return features, labels

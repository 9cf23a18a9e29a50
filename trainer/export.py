"""The pretrained backbone, exported for use outside this project.

- ``OUTPUT_DIR/backbone.safetensors`` + ``backbone.json`` (timm model name, feature width, stem, timm
  arguments, image size; the same metadata in the safetensors header): what ``evaluate.py --checkpoint``
  reads, and loadable with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH),
  num_classes=0)`` for a stock architecture;
- ``OUTPUT_DIR/backbone/`` (``config.json`` + ``model.safetensors``, timm's own local-directory convention)
  wherever timm can express the architecture (not with the CIFAR stem, which replaces timm's):
  ``timm.create_model("local-dir:OUTPUT_DIR/backbone", pretrained=True)``.
Every file is written beside its final name and renamed into place (``common.files``)."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save

from common.files import (
    atomic_write_bytes,
    atomic_write_text,
    create_temporary_directory,
    fsync_directory,
    give_open_mode,
)


def export_backbone(backbone: torch.nn.Module, output_dir: str | Path, meta: dict) -> Path:
    """Write the exports above for ``backbone`` (a timm model with ``num_classes=0``); returns the
    ``.safetensors`` path. ``meta``: model_name, num_features, cifar_stem, timm_kwargs, image_size."""
    output_dir = Path(output_dir)
    weights = output_dir / "backbone.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    # bytes written by atomic_write_bytes: safetensors' save_file would make the file 0600
    atomic_write_bytes(weights, save(state, metadata={k: json.dumps(v) for k, v in meta.items()}))
    atomic_write_text(output_dir / "backbone.json", json.dumps(meta, indent=1) + "\n")
    if not meta.get("cifar_stem"):
        _export_local_dir(backbone, output_dir / "backbone", meta)
    return weights


def _export_local_dir(backbone: torch.nn.Module, target: Path, meta: dict) -> None:
    """timm's ``save_for_hf`` layout in ``target`` (replaced as a whole, never left half-written)."""
    from timm.models import save_for_hf

    size = meta.get("image_size") or 224
    backbone = (
        copy.deepcopy(backbone).cpu().to(memory_format=torch.contiguous_format)
    )  # safetensors stores contiguous tensors
    backbone.pretrained_cfg = {
        **(backbone.pretrained_cfg or {}),
        "tag": "simclr",
        "input_size": [3, size, size],
        "test_input_size": [3, size, size],
    }
    staging = create_temporary_directory(target.parent, prefix=".backbone-")
    try:
        save_for_hf(
            backbone, staging, model_args={**meta.get("timm_kwargs", {}), "num_classes": 0}, safe_serialization=True
        )
        for file in staging.iterdir():
            give_open_mode(file)  # timm writes model.safetensors through safetensors' save_file: 0600
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(staging)
        old = target.with_name(target.name + ".old")
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        fsync_directory(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

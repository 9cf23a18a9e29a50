"""Load the backbone to evaluate: from a train.py run or checkpoint, an exported safetensors file, or any
timm model (optionally with a weights file)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.simclr import create_backbone


class BackboneError(ValueError):
    """The backbone cannot be loaded as asked; the message names the file."""


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _meta_for(path: Path) -> dict:
    """Architecture metadata: backbone.json beside an export, or trainer_state.json's config in a checkpoint."""
    if (path / "backbone.json").exists():
        return json.loads((path / "backbone.json").read_text())
    if (path / "trainer_state.json").exists():
        config = json.loads((path / "trainer_state.json").read_text())["config"]
        return {"model_name": config["backbone"], "cifar_stem": config["cifar_stem"], "timm_kwargs": config["timm_kwargs"],
                "image_size": config["image_size"]}
    raise BackboneError(f"{path} is neither a train.py output directory (backbone.json) nor a checkpoint (trainer_state.json)")


def load_backbone(checkpoint: str | None = None, model_name: str | None = None, weights: str | None = None,
                  random_init: bool = False, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Returns (backbone with num_classes=0, info dict with model_name, image_size (if known), source, sha256).

    ``checkpoint``: a train.py output directory, a checkpoint directory (``checkpoints/step_*``) or a
    ``backbone.safetensors`` file. ``model_name`` (+ ``weights``): any timm model. ``random_init``: the
    same architecture with freshly initialised weights (the baseline)."""
    state, source = None, None
    if checkpoint:
        path = Path(checkpoint)
        if not path.exists():
            raise BackboneError(f"checkpoint {path} does not exist")
        if path.is_file():
            meta = _meta_for(path.parent) if (path.parent / "backbone.json").exists() else {}
            weights_file = path
        else:
            meta = _meta_for(path)
            weights_file = path / "backbone.safetensors" if (path / "backbone.safetensors").exists() else path / "model.safetensors"
        if model_name:
            meta["model_name"] = model_name
        if "model_name" not in meta:
            raise BackboneError(f"{path}: no backbone.json beside it; pass --model NAME to say which timm architecture it is")
        if not random_init:
            if not weights_file.exists():
                raise BackboneError(f"{path}: no weights file {weights_file.name}")
            state = load_file(str(weights_file))
            if weights_file.name == "model.safetensors":  # a full SimCLR state from a checkpoint
                state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            source = str(weights_file)
    elif model_name:
        meta = {"model_name": model_name, "cifar_stem": False, "timm_kwargs": {}}
        if weights and not random_init:
            weights_path = Path(weights)
            if not weights_path.is_file():
                raise BackboneError(f"weights file {weights_path} does not exist")
            state = load_file(str(weights_path)) if weights_path.suffix == ".safetensors" else torch.load(weights_path, map_location="cpu", weights_only=True)
            source = str(weights_path)
    else:
        raise BackboneError("say which backbone to evaluate: --checkpoint PATH or --model NAME [--weights FILE]")
    torch.manual_seed(seed)
    backbone = create_backbone(meta["model_name"], cifar_stem=meta.get("cifar_stem", False), **meta.get("timm_kwargs", {}))
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head.fc.", "classifier."))} if not meta.get("cifar_stem") else state
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BackboneError(f"{source} does not fit a {meta['model_name']} backbone (cifar_stem={meta.get('cifar_stem', False)}): "
                                f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    info = {"model_name": meta["model_name"], "source": "random-init" if random_init else (source or "timm default init"),
            "sha256": file_digest(Path(source)) if source else None, "image_size": meta.get("image_size")}
    return backbone, info

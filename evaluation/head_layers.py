"""SimCLRv2's fine-tuning from inside the projection head (the official code's ``ft_proj_selector``): the
evaluated network is the backbone followed by the first j layers of the pretrained head (0 = the backbone
alone, as the first paper; 1 = up to the first layer's ReLU, SimCLRv2's choice with its 3-layer head). Every
protocol sees it as "the backbone" (kNN, linear and fine-tuning alike), its width that of layer j.

The head comes from where the backbone does: an export directory or a train.py output directory
(``head.safetensors`` + ``head.json``, which records its depth), or a checkpoint directory (the ``head.*``
weights of ``model.safetensors``, the widths and depth from the run's config)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..model.settings import model_settings
from ..model.simclr import ProjectionHead
from .backbone import BackboneError

HEAD_FILE, HEAD_META = "head.safetensors", "head.json"


class BackboneWithHead(nn.Module):
    """(B, 3, H, W) -> backbone -> the kept head layers -> (B, num_features); ``num_features`` (and
    ``head_hidden_size``, what ``model.simclr.feature_dim`` reads first) is the last kept layer's width."""

    def __init__(self, backbone: nn.Module, head_layers: nn.Sequential, width: int):
        super().__init__()
        self.backbone, self.head_layers = backbone, head_layers
        self.num_features = self.head_hidden_size = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head_layers(self.backbone(images))


def head_from_export(path: Path) -> ProjectionHead:
    """The projection head an export directory holds (``head.json``'s widths, ``head.safetensors``' weights);
    a BackboneError naming the file if they are malformed or do not fit (simclr-export's loader reads it too)."""
    widths = json.loads((path / HEAD_META).read_text())
    if not all(isinstance(widths.get(k), int) for k in ("in_dim", "hidden_dim", "out_dim")):
        raise BackboneError(
            f"{path / HEAD_META} must give integer in_dim, hidden_dim and out_dim, got {widths}"
        )
    head = ProjectionHead(
        widths["in_dim"], widths["hidden_dim"], widths["out_dim"], widths.get("num_layers", 2)
    )
    try:
        head.load_state_dict(load_file(str(path / HEAD_FILE)))
    except (OSError, RuntimeError) as error:
        raise BackboneError(
            f"{path / HEAD_FILE} does not fit the head {path / HEAD_META} describes: {error}"
        ) from None
    return head


def _head_from_checkpoint(path: Path, feature_width: int) -> ProjectionHead:
    config = json.loads((path / "trainer_state.json").read_text()).get("config") or {}
    model = model_settings(config)
    head = ProjectionHead(
        feature_width,
        model.get("proj_hidden") or feature_width,
        model.get("proj_dim", 128),
        model.get("proj_layers", 2),
    )
    state = load_file(str(path / "model.safetensors"))
    try:
        head.load_state_dict(
            {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
        )
    except RuntimeError as error:
        raise BackboneError(
            f"{path / 'model.safetensors'}: the head does not fit the run's config: {error}"
        ) from None
    return head


def load_head(checkpoint: str | Path, feature_width: int) -> ProjectionHead:
    """The pretrained projection head beside ``checkpoint`` (export, train.py output dir or checkpoint dir)."""
    path = Path(checkpoint)
    if (path / HEAD_META).is_file():
        return head_from_export(path)
    if (path / "trainer_state.json").is_file() and (path / "model.safetensors").is_file():
        return _head_from_checkpoint(path, feature_width)
    raise BackboneError(
        f"{path} holds no projection head (head.json + head.safetensors, or a checkpoint's model.safetensors): "
        "--ft_proj_selector needs one"
    )


def with_head_layers(
    backbone: nn.Module, checkpoint: str | None, count: int, random: bool = False
) -> nn.Module:
    """``backbone`` itself for ``count`` 0, else the backbone followed by the first ``count`` pretrained head
    layers (BackboneErrors name the checkpoint and the head's depth); ``random``: the same layers freshly
    initialised (a distillation student, a random-init baseline)."""
    if count == 0:
        return backbone
    if not checkpoint:
        raise BackboneError(
            "--ft_proj_selector > 0 needs --checkpoint (the head comes from the pretrained run)"
        )
    from ..model.simclr import feature_dim

    head = load_head(checkpoint, feature_dim(backbone))
    if count > head.num_layers:
        raise BackboneError(
            f"--ft_proj_selector {count}: the head of {checkpoint} has only {head.num_layers} layers"
        )
    layers = head.layers(count)
    if random:
        for module in layers.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return BackboneWithHead(backbone, layers, head.out_width(count))

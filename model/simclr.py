"""SimCLR model: a timm backbone f (pooled features h) and the MLP projection head g (z = g(h))."""

from __future__ import annotations

import timm
import torch
from torch import nn


class ProjectionHead(nn.Sequential):
    """The paper's head: Linear -> BN -> ReLU -> Linear -> BN (no bias anywhere; the last BN has no
    shift, as in the official code's ``linear_layer(use_bias=False, use_bn=True)``).

    (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        last_norm = nn.BatchNorm1d(out_dim)
        nn.init.zeros_(last_norm.bias)
        last_norm.bias.requires_grad_(False)
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
            last_norm,
        )


def feature_dim(backbone: nn.Module) -> int:
    """Width of a timm model's pooled output with ``num_classes=0``: ``head_hidden_size`` (e.g. 1024 for
    MobileNetV3, whose head convolution follows the pooling), which equals ``num_features`` for most models."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


def create_backbone(name: str, pretrained: bool = False, cifar_stem: bool = False, **timm_kwargs) -> nn.Module:
    """A timm model with its classifier removed (``num_classes=0``): (B, 3, H, W) -> (B, feature_dim(model)).

    ``cifar_stem`` replaces a ResNet-family stem (7x7 stride-2 conv + max-pool) with the 3x3 stride-1
    conv and no pool that the paper uses for 32 px CIFAR images (App. B.9)."""
    backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
    if cifar_stem:
        conv1 = getattr(backbone, "conv1", None)
        if not isinstance(conv1, nn.Conv2d) or not hasattr(backbone, "maxpool"):
            raise ValueError(
                f"cifar_stem needs a ResNet-style model with a single conv1 and a maxpool; {name!r} has no such stem"
            )
        backbone.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
        backbone.maxpool = nn.Identity()
    return backbone


class SimCLR(nn.Module):
    """``forward(x) -> (h, z)``: h (B, feature_dim) pooled backbone features, z (B, proj_dim) projections.

    ``proj_hidden`` defaults to the backbone's feature width (2048 -> 2048 -> 128 for ResNet-50)."""

    def __init__(
        self,
        backbone: str = "resnet50",
        proj_hidden: int | None = None,
        proj_dim: int = 128,
        pretrained: bool = False,
        cifar_stem: bool = False,
        **timm_kwargs,
    ):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained=pretrained, cifar_stem=cifar_stem, **timm_kwargs)
        self.feature_dim = feature_dim(self.backbone)
        self.head = ProjectionHead(self.feature_dim, proj_hidden or self.feature_dim, proj_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        return h, self.head(h)

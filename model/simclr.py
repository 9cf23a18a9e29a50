"""SimCLR model: a timm backbone f (pooled features h) and the MLP projection head g (z = g(h))."""

from __future__ import annotations

import timm
import torch
from torch import nn


class ProjectionHead(nn.Sequential):
    """The projection head of ``num_layers`` linear layers (2: the first paper's; 3: SimCLRv2's): each but the
    last is Linear -> BN -> ReLU, the last Linear -> BN, no bias anywhere and no shift in the last BN, as the
    official code's ``projection_head`` (``linear_layer(use_bias=True, use_bn=True)`` for the middle layers: the
    bias moves into the BN's shift; ``use_bias=False`` for the last). Module indices 3 (j - 1), 3 (j - 1) + 1,
    3 (j - 1) + 2 are layer j's (Linear, BN, ReLU): ``layers(j)`` is the head up to layer j's output, what
    SimCLRv2 fine-tunes from (``ft_proj_selector``). Two layers keep the earlier modules' names.

    (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2):
        if num_layers < 1:
            raise ValueError(f"a projection head needs num_layers >= 1, got {num_layers}")
        modules: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            modules += [
                nn.Linear(width, hidden_dim, bias=False),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
            ]
            width = hidden_dim
        last_norm = nn.BatchNorm1d(out_dim)
        nn.init.zeros_(last_norm.bias)
        last_norm.bias.requires_grad_(False)
        super().__init__(*modules, nn.Linear(width, out_dim, bias=False), last_norm)
        self.num_layers = num_layers

    def layers(self, count: int) -> nn.Sequential:
        """The first ``count`` layers (shared modules, not copies): 0 = nothing (identity), ``num_layers`` = the
        whole head. Middle layers end with their ReLU, as the official code's hiddens_list."""
        if not 0 <= count <= self.num_layers:
            raise ValueError(f"the head has {self.num_layers} layers; cannot keep {count}")
        if count == self.num_layers:
            return nn.Sequential(*self)
        return nn.Sequential(*list(self)[: 3 * count])

    def out_width(self, count: int) -> int | None:
        """Width of the output of the first ``count`` layers; None for 0 (the backbone's)."""
        linears = [m for m in self if isinstance(m, nn.Linear)]
        return linears[count - 1].out_features if count else None


def feature_dim(backbone: nn.Module) -> int:
    """Width of a timm model's pooled output with ``num_classes=0``: ``head_hidden_size`` (e.g. 1024 for
    MobileNetV3, whose head convolution follows the pooling), which equals ``num_features`` for most models."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


def create_backbone(
    name: str, pretrained: bool = False, cifar_stem: bool = False, **timm_kwargs
) -> nn.Module:
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
        backbone.conv1 = nn.Conv2d(
            conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False
        )
        backbone.maxpool = nn.Identity()
    return backbone


class SimCLR(nn.Module):
    """``forward(x) -> (h, z)``: h (B, feature_dim) pooled backbone features, z (B, proj_dim) projections.

    ``proj_hidden`` defaults to the backbone's feature width (2048 -> 2048 -> 128 for ResNet-50); ``proj_layers``
    is the head's depth (2 as the first paper, 3 as SimCLRv2)."""

    def __init__(
        self,
        backbone: str = "resnet50",
        proj_hidden: int | None = None,
        proj_dim: int = 128,
        pretrained: bool = False,
        cifar_stem: bool = False,
        proj_layers: int = 2,
        **timm_kwargs,
    ):
        super().__init__()
        self.backbone = create_backbone(
            backbone, pretrained=pretrained, cifar_stem=cifar_stem, **timm_kwargs
        )
        self.feature_dim = feature_dim(self.backbone)
        self.head = ProjectionHead(
            self.feature_dim, proj_hidden or self.feature_dim, proj_dim, proj_layers
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        return h, self.head(h)

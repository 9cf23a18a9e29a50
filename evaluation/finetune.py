"""Fine-tuning: the whole backbone plus a linear head on labelled data (the paper's semi-supervised
protocol on a 1% / 10% class-balanced label subset, see ``evaluation.subset``).

As SimCLR v1 (Chen et al. 2020, §B.5): SGD with Nesterov momentum 0.9, lr = 0.05 x batch / 256, cosine
decay, no warm-up, no weight decay or other regularisation, random resized crop + flip only. BN runs in
train mode (global across processes, as in pretraining)."""

from __future__ import annotations

import copy

import torch

from ..model.global_bn import convert_to_global_bn
from ..model.simclr import feature_dim
from .classifier import train_classifier


class Classifier(torch.nn.Module):
    """``backbone`` (pooled features (B, D)) followed by a linear layer: (B, 3, S, S) -> logits (B, C)."""

    def __init__(self, backbone: torch.nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = torch.nn.Linear(feature_dim(backbone), num_classes)
        torch.nn.init.zeros_(
            self.fc.weight
        )  # the official code's supervised head starts at (near) zero
        torch.nn.init.zeros_(self.fc.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(images))


def finetune(
    backbone: torch.nn.Module,
    loader,
    num_classes: int,
    accelerator,
    epochs: int,
    lr: float = 0.05,
    momentum: float = 0.9,
    progress: bool = True,
) -> Classifier:
    """A copy of ``backbone`` + linear head, all trained for ``epochs`` epochs of ``loader`` (usually restricted
    to a label subset) with ``evaluation.classifier.train_classifier``; every batch-norm layer global when there
    are several processes. ``backbone`` itself is not modified. Returns the fine-tuned classifier (eval mode)."""
    model = Classifier(copy.deepcopy(backbone), num_classes)
    model.requires_grad_(True)
    if accelerator.num_processes > 1:
        model = convert_to_global_bn(model, accelerator.device.type)
    return train_classifier(
        model, loader, accelerator, epochs, lr, momentum, desc="fine-tune", progress=progress
    )

"""Linear evaluation of a frozen backbone, two ways:

- ``train_linear_on_features`` (fast mode): features extracted once with the centre crop and cached on the
  device, then many cheap epochs over them; the classifier sees standardised features.
- ``train_linear_augmented`` (the paper's mode): every epoch reads the training shards again through an
  augmenting loader (random resized crop + flip); the backbone stays frozen in eval mode (no BN update)
  and only the linear head learns, across processes with DDP.
Both: SGD with Nesterov momentum 0.9, cosine schedule, no weight decay, lr = base lr x batch / 256."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..model.simclr import feature_dim
from .classifier import FrozenBackbone, train_classifier
from .knn import topk_accuracy
from .optim import sgd_cosine


def train_linear_on_features(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 1024,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> torch.nn.Module:
    """A linear classifier on standardised features: SGD with Nesterov momentum, cosine schedule, no weight
    decay by default (the paper's protocol; lr is scaled by batch/256).
    Returns ``nn.Sequential(standardise, linear)``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    mean = train_features.mean(0)
    std = train_features.std(0).clamp_min(1e-6)
    linear = torch.nn.Linear(train_features.shape[1], num_classes).to(train_features.device)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer, scheduler = sgd_cosine(
        linear.parameters(),
        lr,
        batch_size,
        epochs * math.ceil(len(train_labels) / batch_size),
        momentum,
        weight_decay,
    )
    standardised = (train_features - mean) / std
    for _ in tqdm(
        range(epochs),
        desc="linear (cached features)",
        unit="epoch",
        disable=not progress,
        leave=False,
    ):
        order = torch.randperm(len(train_labels), generator=generator).to(train_features.device)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(linear(standardised[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return torch.nn.Sequential(_Standardise(mean, std), linear).eval()


class _Standardise(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@torch.no_grad()
def evaluate_classifier(
    classifier: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor, chunk: int = 8192
) -> dict[str, float]:
    scores = torch.cat(
        [classifier(features[i : i + chunk]) for i in range(0, len(features), chunk)]
    )
    return topk_accuracy(scores, labels)


class LinearHead(torch.nn.Sequential):
    """Batch norm without affine parameters, then a linear layer: BN standardises the features during
    training (as the fast mode's standardisation; MAE and MoCo v3 do the same) and is a fixed affine map at
    test time, so the classifier stays linear in the features."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__(
            torch.nn.BatchNorm1d(in_dim, affine=False), torch.nn.Linear(in_dim, num_classes)
        )
        torch.nn.init.zeros_(self[1].weight)
        torch.nn.init.zeros_(self[1].bias)


def train_linear_augmented(
    backbone: torch.nn.Module,
    loader,
    num_classes: int,
    accelerator,
    epochs: int = 90,
    lr: float = 0.1,
    momentum: float = 0.9,
    progress: bool = True,
) -> torch.nn.Module:
    """A ``LinearHead`` trained on a frozen ``backbone`` (eval mode, no gradients, BN statistics untouched)
    over ``epochs`` epochs of ``loader`` (an augmenting loader: a fresh crop + flip every epoch), with
    ``evaluation.classifier.train_classifier``. Returns the trained head (eval mode) on the accelerator's device."""
    head = LinearHead(feature_dim(backbone), num_classes)
    model = torch.nn.Sequential(FrozenBackbone(backbone), head)
    return train_classifier(
        model,
        loader,
        accelerator,
        epochs,
        lr,
        momentum,
        desc="linear (augmented)",
        progress=progress,
    )[1]

"""Linear probe on cached frozen features (the fast mode of the paper's linear evaluation)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .knn import topk_accuracy


def train_linear_on_features(train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                             epochs: int = 100, batch_size: int = 1024, lr: float = 0.1, momentum: float = 0.9,
                             weight_decay: float = 0.0, seed: int = 0) -> torch.nn.Module:
    """A linear classifier on standardised features: SGD with Nesterov momentum, cosine schedule, no weight
    decay by default (the paper's protocol; lr is scaled by batch/256). Returns ``nn.Sequential(standardise, linear)``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    mean = train_features.mean(0)
    std = train_features.std(0).clamp_min(1e-6)
    linear = torch.nn.Linear(train_features.shape[1], num_classes).to(train_features.device)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.SGD(linear.parameters(), lr=lr * batch_size / 256, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_labels) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    standardised = (train_features - mean) / std
    for _ in range(epochs):
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
def evaluate_classifier(classifier: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    scores = torch.cat([classifier(features[i : i + chunk]) for i in range(0, len(features), chunk)])
    return topk_accuracy(scores, labels)

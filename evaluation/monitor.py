"""kNN + a fast linear classifier on a backbone's frozen features, on two shard sets: what train.py evaluates
during training to monitor it (``frozen_metrics``), cheap enough to run every few epochs."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from ..pipeline.loader import DaliLoader
from ..pipeline.shards.location import count_classes
from .features import extract_features
from .knn import knn_predict, topk_accuracy
from .linear import evaluate_classifier, train_linear_on_features


def frozen_metrics(
    backbone: torch.nn.Module,
    train_loader: DaliLoader,
    val_loader: DaliLoader,
    accelerator: Accelerator | None = None,
    k: int = 200,
    knn_temperature: float = 0.1,
    linear_epochs: int = 100,
    progress: bool = True,
) -> dict[str, float]:
    """{'knn_top1', 'linear_top1', 'linear_top5'} in percent, on the validation shards."""
    train_features, train_labels = extract_features(
        backbone, train_loader, accelerator, "train features", progress
    )
    val_features, val_labels = extract_features(
        backbone, val_loader, accelerator, "val features", progress
    )
    num_classes = count_classes(train_loader.shards, val_loader.shards)
    knn = topk_accuracy(
        knn_predict(train_features, train_labels, val_features, num_classes, [k], knn_temperature)[
            k
        ],
        val_labels,
    )
    classifier = train_linear_on_features(
        train_features, train_labels, num_classes, epochs=linear_epochs
    )
    linear = evaluate_classifier(classifier, val_features, val_labels)
    return {"knn_top1": knn["top1"], "linear_top1": linear["top1"], "linear_top5": linear["top5"]}

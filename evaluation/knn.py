"""Weighted kNN on L2-normalised features (Wu et al. 2018, as used across the SSL literature)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = (200,),
    temperature: float = 0.1,
    chunk: int = 256,
) -> dict[int, torch.Tensor]:
    """Class scores (M, num_classes) for each test feature and each k of ``ks``: the sum over its k most
    cosine-similar train features of exp(similarity / temperature), per class. One pass for every k (the
    neighbours of the largest k, sorted, hold those of the smaller ones, as in DINO's ``eval_knn.py``).
    Test rows are processed in chunks, so only a (chunk, N) block of similarities exists at a time."""
    if not ks or min(ks) < 1:
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    largest = min(max(ks), train.shape[0])
    scores = {k: torch.zeros(test.shape[0], num_classes, device=test.device) for k in ks}
    for start in range(0, test.shape[0], chunk):
        top_similarity, top_index = (test[start : start + chunk] @ train.T).topk(
            largest, dim=1
        )  # sorted, most similar first
        weights, neighbour_labels = (top_similarity / temperature).exp(), train_labels[top_index]
        for k in ks:
            scores[k][start : start + chunk].scatter_add_(
                1, neighbour_labels[:, :k], weights[:, :k]
            )
    return scores


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """{'top1': %, 'top5': %} (k capped at the number of classes)."""
    result = {}
    for k in ks:
        k_eff = min(k, scores.shape[1])
        hit = (scores.topk(k_eff, dim=1).indices == labels[:, None]).any(1)
        result[f"top{k}"] = 100.0 * hit.double().mean().item()
    return result

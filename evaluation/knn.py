"""Weighted kNN on L2-normalised features (Wu et al. 2018, as used across the SSL literature)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk: int = 256) -> torch.Tensor:
    """Class scores (M, num_classes) for each test feature: sum over its k most cosine-similar train
    features of exp(similarity / temperature), per class. Test rows are processed in chunks, so only a
    (chunk, N) block of similarities exists at a time."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = torch.zeros(test.shape[0], num_classes, device=test.device)
    for start in range(0, test.shape[0], chunk):
        similarity = test[start : start + chunk] @ train.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        scores[start : start + chunk].scatter_add_(1, train_labels[top_index], weights)
    return scores


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """{'top1': %, 'top5': %} (k capped at the number of classes)."""
    result = {}
    for k in ks:
        k_eff = min(k, scores.shape[1])
        hit = (scores.topk(k_eff, dim=1).indices == labels[:, None]).any(1)
        result[f"top{k}"] = 100.0 * hit.double().mean().item()
    return result

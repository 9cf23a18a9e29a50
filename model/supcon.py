"""Supervised contrastive learning (SupCon, Khosla et al. 2020) on NT-Xent's fused machinery (model/ntxent.py).

With per-sample labels, every other view of the same label is a positive of an anchor: with P(k) the rows of
k's class other than k itself (its paired view among them), the loss of anchor k is
``lse_k - (1/tau) mean_{p in P(k)} s_kp``, lse_k the log-sum-exp of its logits over every other row: the
official formulation (HobbitLong/SupContrast ``SupConLoss``, contrast_mode 'all', base_temperature = tau),
whose denominator is NT-Xent's. So the heavy part is NT-Xent's unchanged (both backends, both passes); what
SupCon adds needs only per-class sums of the normalised rows, S_c (C x d, over every process's rows):
- forward: sum_{p in P(k)} s_kp = <z_k, S_c - z_k>, so loss_k = ntxent_loss_k + (s_k,pos - mean_pos_k) / tau
  (NT-Xent's loss_k is lse_k - s_k,pos / tau); for a class of one sample (two views) the correction is 0.
- backward: the positive term's gradient is -2 (S_c - z_k) / (|P(k)| tau) per row (each same-class pair
  counts from both of its anchors), where NT-Xent's is -2 z_pos / tau: the difference
  ``2 z_pos - 2 (S_c - z_k) / |P(k)|`` joins the row-gradient's partial sums as one more split, which the
  backend's input_grad merges, scales and carries through the normalisation's backward as it does the rest.
Across processes the labels are gathered (one int per row) and the class sums all-reduced; each process's
rows are grouped by label value through a sort (no host sync: the groups are at most the rows' count)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .ntxent_common import NORM_EPS, row_norms


def check_labels(labels: torch.Tensor, num_pairs: int) -> None:
    """Labels for ``num_pairs`` pairs: an integer tensor of shape (num_pairs,); else ValueError."""
    if labels.shape != (num_pairs,):
        raise ValueError(
            f"SupCon needs one label per pair: labels of shape ({num_pairs},), got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"SupCon labels must be an integer tensor, got {labels.dtype}")


def class_groups(labels: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(local_groups (m,), counts (W m,)): each local row's class index among all processes' rows (rows of
    [z1; z2]: the labels twice), and the number of rows of each class index (zero past the last class)."""
    row_labels = torch.cat([labels, labels]).to(torch.int64)
    all_labels = row_labels
    if world > 1:
        all_labels = torch.empty(
            world * row_labels.shape[0], dtype=torch.int64, device=labels.device
        )
        dist.all_gather_into_tensor(all_labels, row_labels.contiguous())
    sorted_labels, order = torch.sort(all_labels)
    starts = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    groups = torch.empty_like(order)
    groups[order] = torch.cumsum(starts, 0) - 1
    counts = torch.zeros(all_labels.shape[0], dtype=torch.int64, device=labels.device)
    counts.index_add_(0, groups, torch.ones_like(groups))
    m = row_labels.shape[0]
    return groups[rank * m : (rank + 1) * m], counts


def class_sums(
    rows: torch.Tensor, groups: torch.Tensor, num_groups: int, world: int
) -> torch.Tensor:
    """(num_groups, d) in float64: the sum of every process's normalised rows of each class (all-reduced).
    float64 (C x d, cheap) so that S_c - z_k keeps the rows' precision in large classes."""
    sums = torch.zeros((num_groups, rows.shape[1]), dtype=torch.float64, device=rows.device)
    sums.index_add_(0, groups, rows.double())
    if world > 1:
        dist.all_reduce(sums)
    return sums


def positive_terms(
    rows: torch.Tensor, groups: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor
):
    """(others (m, d), num_positives (m,)): per local row k, S_c - z_k (the sum of its positives) and |P(k)|,
    in the rows' dtype (the difference taken in float64)."""
    return (sums[groups] - rows.double()).to(rows.dtype), (counts[groups] - 1).to(rows.dtype)


def loss_correction(
    rows: torch.Tensor, others: torch.Tensor, num_positives: torch.Tensor, inv_temp: float
):
    """(m,): (s_k,pos - mean_{p in P(k)} s_kp) / tau, what turns NT-Xent's loss_k into SupCon's."""
    half = rows.shape[0] // 2
    paired = rows.roll(-half, 0)
    return (rows * (paired * num_positives[:, None] - others)).sum(1) * (inv_temp / num_positives)


def grad_split(
    rows: torch.Tensor, others: torch.Tensor, num_positives: torch.Tensor
) -> torch.Tensor:
    """(1, m, d): 2 z_pos - 2 (S_c - z_k) / |P(k)|, added to the row gradient's partial sums (before the
    scale 1/(tau m) and the normalisation's backward, both applied by the backend's input_grad)."""
    half = rows.shape[0] // 2
    return (2.0 * (rows.roll(-half, 0) - others / num_positives[:, None]))[None]


def supcon_reference(
    z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1
):
    """The plain formulation (the 2N x 2N logits and the same-label mask), for tests: per anchor, minus the mean
    over its positives of log softmax over all other rows; the mean over the 2N anchors."""
    both = torch.cat([z1, z2])
    z = both / row_norms(both).clamp_min(NORM_EPS)[:, None]
    row_labels = torch.cat([labels, labels])
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = F.log_softmax(logits, 1).masked_fill(eye, 0.0)
    positive = (row_labels[:, None] == row_labels[None, :]) & ~eye
    return -((log_prob * positive).sum(1) / positive.sum(1)).mean()

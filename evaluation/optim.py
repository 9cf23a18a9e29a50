"""The evaluation protocols' optimiser (linear probe, fine-tuning): SGD with Nesterov momentum + cosine, kept on
the evaluation side so that evaluation depends on model, pipeline and common only (tests/test_structure.py)."""

from __future__ import annotations

import torch


def sgd_cosine(
    parameters,
    base_lr: float,
    batch_size: int,
    steps: int,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
):
    """The evaluation protocols' optimiser: SGD with Nesterov momentum at ``base_lr x batch_size / 256``,
    cosine over ``steps`` (no warm-up)."""
    optimizer = torch.optim.SGD(
        parameters,
        lr=base_lr * batch_size / 256,
        momentum=momentum,
        nesterov=True,
        weight_decay=weight_decay,
    )
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))

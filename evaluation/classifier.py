"""Supervised training on an augmenting loader: the one loop the paper's linear evaluation (``--augment``:
a frozen backbone + linear head) and fine-tuning (the whole backbone + a linear layer) both run.

SGD with Nesterov momentum, cosine schedule, no weight decay, lr = base lr x global batch / 256; the model
is prepared by Accelerate (DDP across processes: the global batch is ``loader.batch_size x processes``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .optim import sgd_cosine


class FrozenBackbone(torch.nn.Module):
    """A backbone used as a fixed feature extractor: always in eval mode (BN statistics untouched), no
    gradients, float32 features (B, D) out whatever the autocast."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenBackbone:
        return self  # stays in eval mode when the model around it trains

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone(images).float()


def train_classifier(
    model: torch.nn.Module,
    loader,
    accelerator,
    epochs: int,
    base_lr: float,
    momentum: float = 0.9,
    desc: str = "classifier",
    progress: bool = True,
) -> torch.nn.Module:
    """Train ``model`` (images (B, 3, S, S) -> logits (B, C); only its parameters that require grad learn) with
    cross-entropy for ``epochs`` epochs of ``loader`` (``(images, labels)`` batches, a fresh augmentation every
    epoch). Returns the trained model, unwrapped, in eval mode, on the accelerator's device."""
    model = model.to(accelerator.device)
    global_batch = loader.batch_size * accelerator.num_processes
    learnable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = sgd_cosine(
        learnable, base_lr, global_batch, epochs * len(loader), momentum
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    for _ in tqdm(
        range(epochs),
        desc=desc,
        unit="epoch",
        disable=not (progress and accelerator.is_main_process),
    ):
        for images, labels in loader:
            with accelerator.autocast():
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
    return accelerator.unwrap_model(model).eval()

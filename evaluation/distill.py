"""SimCLRv2's third step, self-distillation (Chen et al. 2020b, §2): a student trained on unlabelled images
against the fine-tuned teacher's softened predictions,
    L = - sum_x sum_y P_T(y | x; tau) log P_S(y | x; tau),  P(y | x; tau) = softmax(logits / tau),
with no label used (the paper's self-distillation: the student has the teacher's architecture, a fresh
backbone + linear head, trained from random initialisation on the unlabelled set; tau = 1, the paper's
temperature). The teacher runs in eval mode on the same augmented view as the student (random resized crop
+ flip, the fine-tuning augmentation). SGD with Nesterov momentum, cosine schedule, no weight decay,
lr = base lr x global batch / 256, as the other training protocols (evaluation/classifier.py)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .optim import sgd_cosine


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over the batch of the cross-entropy between the teacher's and the student's softened predictions."""
    targets = F.softmax(teacher_logits.float() / temperature, dim=1)
    return -(targets * F.log_softmax(student_logits.float() / temperature, dim=1)).sum(1).mean()


@torch.no_grad()
def agreement(student: torch.nn.Module, teacher: torch.nn.Module, loader, accelerator) -> float:
    """Share (%) of ``loader``'s images (its first element of each batch) on which the student's top class is the
    teacher's: how well the student matches its teacher (both in eval mode)."""
    student.eval()
    same = total = 0
    for batch in loader:
        images = batch[0]
        with accelerator.autocast():
            same += (student(images).argmax(1) == teacher(images).argmax(1)).sum().item()
        total += images.shape[0]
    return 100.0 * same / max(total, 1)


def distill(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    loader,
    accelerator,
    epochs: int,
    lr: float = 0.1,
    temperature: float = 1.0,
    progress: bool = True,
) -> tuple[torch.nn.Module, list[float]]:
    """Train a copy of ``student`` (images -> logits over the teacher's classes) on ``loader``'s unlabelled
    batches ``(images,)`` against ``teacher`` (frozen, eval mode) for ``epochs`` epochs. Returns the trained
    student (eval mode) and its mean loss per epoch."""
    teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
    model = copy.deepcopy(student).to(accelerator.device).requires_grad_(True)
    global_batch = loader.batch_size * accelerator.num_processes
    optimizer, scheduler = sgd_cosine(
        list(model.parameters()), lr, global_batch, epochs * len(loader)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    losses = []
    for _ in tqdm(
        range(epochs),
        desc="distill",
        unit="epoch",
        disable=not (progress and accelerator.is_main_process),
    ):
        total = torch.zeros((), device=accelerator.device)
        steps = 0
        for batch in loader:
            images = batch[0]
            with accelerator.autocast():
                with torch.no_grad():
                    targets = teacher(images)
                loss = distillation_loss(model(images), targets, temperature)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            total += loss.detach()
            steps += 1
        losses.append(accelerator.reduce(total, "mean").item() / max(steps, 1))
    return accelerator.unwrap_model(model).eval(), losses

"""The model of a training run, built from its TrainConfig (what train.py, the benchmarks and the
distributed tests share)."""

from __future__ import annotations

import torch

from ..model.global_bn import convert_to_global_bn
from ..model.simclr import SimCLR
from .config import TrainConfig


def build_model(cfg: TrainConfig, device_type: str, world_size: int) -> SimCLR:
    """SimCLR with global BN across processes (when asked and world > 1), channels-last if asked."""
    model = SimCLR(
        cfg.model.backbone,
        cfg.model.proj_hidden,
        cfg.model.proj_dim,
        pretrained=cfg.model.pretrained,
        cifar_stem=cfg.model.cifar_stem,
        proj_layers=cfg.model.proj_layers,
        **cfg.model.timm_kwargs,
    )
    if world_size > 1 and cfg.sync_bn:
        model = convert_to_global_bn(model, device_type)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def prepare_for_training(accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """``accelerator.prepare(model, optimizer)`` (device placement, DDP), without the output wrapper Accelerate
    puts on a mixed-precision model: that wrapper casts every output to float32, which would hand the loss
    float32 projections under bf16. ``trainer.step.train_step`` runs the forward in ``accelerator.autocast()``
    itself, so the projections reach the loss in the autocast dtype (tensor-core operands for its kernels).

    On CUDA it also sets ``torch.backends.cudnn.benchmark``: training shapes are fixed (whole batches of one
    image size; micro-batches of at most two sizes), so cuDNN times its convolution algorithms once per shape
    and keeps the fastest (the choice is by timing, so two runs may pick different algorithms: bitwise
    equality across processes is not promised by cuDNN either way)."""
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.unwrap_model(
        model, keep_fp32_wrapper=False
    )  # restores the module's own forward, in place
    return model, optimizer

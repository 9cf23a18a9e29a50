"""Global ("sync") batch norm: statistics over the whole global batch, as the paper requires (a
per-device BN lets the model cheat through batch statistics).

On every device this is ``GlobalBatchNorm``: one differentiable all-reduce of per-channel sums (sum, sum of
squares, count) per layer and forward, and nothing that waits for the device. It keeps timm's norm + activation
layers (``BatchNormAct2d``: EfficientNet, ResNetV2, RegNet, ...) whole. Not ``torch.nn.SyncBatchNorm``, whose
fused kernels are faster per layer but whose forward indexes its gathered statistics with a boolean mask (a
host sync per BN layer per forward: ~54 a forward of a ResNet-50, times every micro-batch under gradient
caching), and which refuses CPU tensors: tests/test_no_host_sync.py runs the step under a dispatch mode that
fails on any host sync."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_GROUP = None


def _statistics_group():
    """A process group of its own for the statistics all-reduces. They run inside the backward pass,
    overlapping DDP's asynchronous gradient all-reduces; sharing one gloo group, the two streams of
    collectives hung intermittently in our 2-process tests. Separate groups keep each stream ordered."""
    global _GROUP
    if _GROUP is None:
        _GROUP = dist.new_group(backend=dist.get_backend())
    return _GROUP


class GlobalBatchNorm(_BatchNorm):
    """Batch norm over all processes' samples for any input rank >= 2 (B, C, ...)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"GlobalBatchNorm expects (B, C, ...) input, got shape {tuple(input.shape)}"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x = input.to(
            torch.promote_types(input.dtype, torch.float32)
        )  # 16-bit -> float32; float64 stays float64
        count = torch.full((1,), x.numel() / channels, dtype=x.dtype, device=x.device)
        totals = dist_fn.all_reduce(
            torch.cat([x.sum(dims), (x * x).sum(dims), count]), group=_statistics_group()
        )
        n = totals[-1]
        mean = totals[:channels] / n
        var = (totals[channels : 2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (
                    self.momentum
                )  # None: the cumulative average, 1 / count as a tensor (float() would sync)
                if momentum is None:
                    momentum = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), momentum)
        shape = [1, channels] + [1] * (input.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


class GlobalBatchNormAct(GlobalBatchNorm):
    """timm's ``BatchNormAct2d`` made global on the CPU: the global batch norm, then the layer's own drop and
    activation (as timm's ``SyncBatchNormAct`` does on CUDA)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(input)))


def convert_to_global_bn(module: nn.Module, device_type: str = "cpu") -> nn.Module:
    """Every batch-norm layer of ``module`` made global (``GlobalBatchNorm``; ``BatchNormAct2d`` ->
    ``GlobalBatchNormAct``, its activation and drop kept), the same on every ``device_type``: no host sync."""
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        act = isinstance(module, BatchNormAct2d)
        converted = (GlobalBatchNormAct if act else GlobalBatchNorm)(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if act:
            converted.act, converted.drop = module.act, module.drop
        if module.affine:
            converted.weight, converted.bias = (
                module.weight,
                module.bias,
            )  # the same parameters (requires_grad kept)
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_to_global_bn(child, device_type))
    return converted

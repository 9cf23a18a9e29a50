"""Global ("sync") batch norm: statistics over the whole global batch, as the paper requires (a
per-device BN lets the model cheat through batch statistics).

On CUDA this is ``torch.nn.SyncBatchNorm`` (fused kernels). PyTorch's SyncBatchNorm refuses CPU
tensors, so on CPU (gloo; tests and laptops) ``GlobalBatchNorm`` computes the same thing with a
differentiable all-reduce of per-channel sums."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
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
            raise ValueError(f"GlobalBatchNorm expects (B, C, ...) input, got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x = input.float()
        count = torch.full((1,), x.numel() / channels, dtype=torch.float32, device=x.device)
        totals = dist_fn.all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]), group=_statistics_group())
        n = totals[-1]
        mean = totals[:channels] / n
        var = (totals[channels : 2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), momentum)
        shape = [1, channels] + [1] * (input.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def convert_to_global_bn(module: nn.Module, device_type: str) -> nn.Module:
    """Every batch-norm layer of ``module`` made global: torch's SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                converted.weight.copy_(module.weight)
                converted.bias.copy_(module.bias)
            converted.weight.requires_grad_(module.weight.requires_grad)
            converted.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            converted.running_mean.copy_(module.running_mean)
            converted.running_var.copy_(module.running_var)
            converted.num_batches_tracked.copy_(module.num_batches_tracked)
    for name, child in module.named_children():
        converted.add_module(name, convert_to_global_bn(child, device_type))
    return converted

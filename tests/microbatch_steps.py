"""Micro-batched (gradient-caching) training steps under torchrun (gloo), with the product's own builders and
``train_step``; saves, from rank 0, the gradients each step handed to the optimiser (after DDP's averaging),
the BN buffers after the step, and which forward call every DDP gradient reduction followed.

    torchrun --standalone --nproc_per_node 2 tests/microbatch_steps.py OUT.pt

Also the helpers tests/test_microbatch.py uses in one process: the tiny configuration, a step that records
its gradients, and a direct reference of the micro-batch-BN objective (no product code but the model).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simclr_dali.model.ntxent import nt_xent_reference  # noqa: E402
from simclr_dali.trainer.build import build_model, prepare_for_training  # noqa: E402
from simclr_dali.trainer.config import ModelConfig, TrainConfig  # noqa: E402
from simclr_dali.trainer.optim import build_optimizer  # noqa: E402
from simclr_dali.trainer.step import train_step  # noqa: E402

GLOBAL_BATCH, IMAGE_SIZE = 16, 16
# zero_init_last=False: the residual branches get gradients at initialisation (timm zeroes their last BN's scale)
TINY = TrainConfig(
    train_shards="unused",
    model=ModelConfig(
        backbone="resnet18",
        cifar_stem=True,
        timm_kwargs={"channels": [8, 16, 32, 64], "zero_init_last": False},
        proj_hidden=32,
        proj_dim=16,
    ),
    batch_size=GLOBAL_BATCH,
    lr=0.5,
    temperature=0.2,
    precision="no",
    sync_bn=True,
)


def global_views(
    seed: int = 1, batch: int = GLOBAL_BATCH, size: int = IMAGE_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (batch, 3, size, size) channels-last views, the same in every process."""
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch, 3, size, size, generator=generator) for _ in range(2)]
    return tuple(view.contiguous(memory_format=torch.channels_last) for view in views)


def bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: buffer.detach().clone()
        for name, buffer in model.named_buffers()
        if "running" in name or "num_batches" in name
    }


def recorded_step(
    cfg: TrainConfig,
    accelerator,
    view1: torch.Tensor,
    view2: torch.Tensor,
    bn_eval: bool = False,
    count_reductions: bool = False,
    seed: int = 0,
    momentum: float | None = 0.1,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """A fresh model (``seed``, BN ``momentum``, parameters in ``dtype``), one ``train_step`` on this process's
    views (cast to ``dtype``); returns the gradients the
    optimiser saw {name: (shape)}, the loss, the BN buffers after the step, and (``count_reductions``,
    DDP only) the index of the forward call each DDP gradient-bucket reduction followed."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    torch.manual_seed(seed)
    model = build_model(cfg, accelerator.device.type, accelerator.num_processes)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.momentum = momentum
    model = model.to(dtype)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = prepare_for_training(accelerator, model, optimizer)
    if bn_eval:
        model.eval()
    grads, forwards, reductions = {}, [0], []
    inner = accelerator.unwrap_model(model)
    optimizer.optimizer.register_step_pre_hook(
        lambda *_: grads.update(
            {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}
        )
    )
    if count_reductions:
        model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

        def counting_allreduce(state, bucket):
            reductions.append(forwards[0])
            return default_hooks.allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_allreduce)
    out = train_step(model, optimizer, view1.to(dtype), view2.to(dtype), cfg, accelerator)
    return {
        "grads": grads,
        "loss": out.loss.item(),
        "buffers": bn_buffers(inner),
        "reductions": reductions,
        "forwards": forwards[0],
    }


def ghost_bn_reference(
    cfg: TrainConfig,
    view1: torch.Tensor,
    view2: torch.Tensor,
    micro_batch: int,
    world: int,
    seed: int = 0,
    momentum: float | None = 0.1,
    dtype: torch.dtype = torch.float64,
) -> dict:
    """The micro-batch-BN objective computed directly, in one process, for ``world`` processes holding
    consecutive equal shares of the global batch (view1, view2: (G, 3, S, S)), each splitting its share into
    micro-batches of ``micro_batch`` images per view (which must divide the share); in ``dtype`` (float64 by
    default: in float32 this objective's gradients move by up to 1% between two orders of summation, while
    in float64 the product and the reference agree to ~1e-12).

    Micro-batch j's BN batch: the j-th micro-batch of every process, both views (global BN). Its rows' z are
    put back in global order, the paper's loss (``nt_xent_reference``, the materialised matrix) is taken
    over all 2G rows, and autograd gives the gradients. Returns {"grads", "loss", "buffers"}: buffers are
    what one update of the running statistics with the mean of the micro-batches' statistics gives (the
    BN ``momentum`` (None: a cumulative average); unbiased variances), num_batches_tracked + 1."""
    share = view1.shape[0] // world
    assert share * world == view1.shape[0] and share % micro_batch == 0, (
        "the reference needs equal micro-batches"
    )
    torch.manual_seed(seed)
    model = build_model(dataclasses.replace(cfg, sync_bn=False), "cpu", 1).to(dtype)
    model.train()
    norms = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    initial = bn_buffers(model)
    seen = {name: [] for name in norms}

    def record(name):
        def hook(module, inputs):
            x = inputs[0].detach().double()
            dims = [0, *range(2, x.dim())]
            seen[name].append((x.mean(dims), x.var(dims, unbiased=True)))

        return hook

    for name, module in norms.items():
        module.register_forward_pre_hook(record(name))
    rows, first, second = [], [], []
    for j in range(share // micro_batch):
        index = torch.cat(
            [
                torch.arange(r * share + j * micro_batch, r * share + (j + 1) * micro_batch)
                for r in range(world)
            ]
        )
        _, z = model(torch.cat([view1[index], view2[index]]).to(dtype))
        rows.append(index)
        first.append(z[: len(index)])
        second.append(z[len(index) :])
    order = torch.cat(rows).argsort()
    z1, z2 = torch.cat(first)[order], torch.cat(second)[order]
    loss = nt_xent_reference(z1, z2, cfg.temperature)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = dict(initial)
    for name in norms:
        count = int(initial[f"{name}.num_batches_tracked"])
        weight = momentum if momentum is not None else 1.0 / (count + 1)
        mean = torch.stack([m for m, _ in seen[name]]).mean(0)
        var = torch.stack([v for _, v in seen[name]]).mean(0)
        buffers[f"{name}.running_mean"] = (
            initial[f"{name}.running_mean"].double().lerp(mean, weight).to(dtype)
        )
        buffers[f"{name}.running_var"] = (
            initial[f"{name}.running_var"].double().lerp(var, weight).to(dtype)
        )
        buffers[f"{name}.num_batches_tracked"] = initial[f"{name}.num_batches_tracked"] + 1
    return {"grads": grads, "loss": loss.item(), "buffers": buffers}


def main(path: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    view1, view2 = global_views()
    local = GLOBAL_BATCH // world
    mine = slice(rank * local, (rank + 1) * local)
    view1, view2 = view1[mine], view2[mine]
    micro = dataclasses.replace(TINY, micro_batch=2)
    results = {
        "world": world,
        # float32, BN in eval mode: the micro-batched gradient is the plain one
        "eval_plain": recorded_step(TINY, accelerator, view1, view2, bn_eval=True),
        "eval_micro": recorded_step(micro, accelerator, view1, view2, bn_eval=True),
        "eval_micro_uneven": recorded_step(
            dataclasses.replace(TINY, micro_batch=3), accelerator, view1, view2, bn_eval=True
        ),
        # DDP gradient reductions: which forward each one followed
        "train_micro": recorded_step(micro, accelerator, view1, view2, count_reductions=world > 1),
        "train_plain": recorded_step(TINY, accelerator, view1, view2, count_reductions=world > 1),
        # float64, global BN in train mode: the micro-batch-BN objective and its running statistics
        "ghost_micro": recorded_step(micro, accelerator, view1, view2, dtype=torch.float64),
        "ghost_micro_cumulative": recorded_step(
            micro, accelerator, view1, view2, dtype=torch.float64, momentum=None
        ),
    }
    if accelerator.is_main_process:
        torch.save(results, path)


if __name__ == "__main__":
    main(sys.argv[1])

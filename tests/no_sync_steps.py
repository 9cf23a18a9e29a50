"""Training steps under a dispatch mode that fails on every host sync: 2 gloo processes under torchrun, the
product's own builders and ``train_step`` (global BN as built for ``BN_DEVICE``, default the conversion a CUDA
run gets), plain and micro-batched (gradient caching). Writes OUT with the ops seen once it is done.

    torchrun --standalone --nproc_per_node 2 tests/no_sync_steps.py OUT [plain|micro]

A host sync is an op whose result the host must wait for: ``aten._local_scalar_dense`` (``.item()``,
``float(t)``, ``if t:``), ``aten.nonzero`` and boolean-mask indexing (their output's size depends on the data).
On one GPU they stall the host; on eight, every one in BN's forward stalls every rank.
"""

import dataclasses
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from microbatch_steps import TINY, global_views  # noqa: E402

from simclr_dali.trainer.build import build_model, prepare_for_training  # noqa: E402
from simclr_dali.trainer.optim import build_optimizer  # noqa: E402
from simclr_dali.trainer.step import train_step  # noqa: E402

aten = torch.ops.aten
SYNCS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.item.default,
}
MASK_INDEXING = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}


class NoHostSync(TorchDispatchMode):
    """Raises on a host sync (module docstring); counts every op it lets through."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCS:
            raise AssertionError(f"host sync: {func}")
        if func in MASK_INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                raise AssertionError(f"host sync: boolean-mask indexing {func}")
        self.ops += 1
        return func(*args, **kwargs)


def main(out: Path, kind: str) -> None:
    """Two steps of ``kind`` ('plain' or 'micro': micro-batches of half this process's share, BN with the
    cumulative average, ``momentum=None``) under ``NoHostSync``, after one warm-up step outside it."""
    accelerator = Accelerator(cpu=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    share = TINY.batch_size // world
    cfg = dataclasses.replace(TINY, micro_batch=share // 2 if kind == "micro" else None)
    torch.manual_seed(0)
    model = build_model(cfg, os.environ.get("BN_DEVICE", "cuda"), world)
    for module in model.modules():
        if kind == "micro" and isinstance(module, _BatchNorm):
            module.momentum = None
    optimizer = build_optimizer(model, cfg)
    model, optimizer = prepare_for_training(accelerator, model, optimizer)
    view1, view2 = global_views()
    view1, view2 = (
        view1[rank * share : (rank + 1) * share],
        view2[rank * share : (rank + 1) * share],
    )
    train_step(
        model, optimizer, view1, view2, cfg, accelerator
    )  # a warm-up outside the mode (lazy state)
    guard = NoHostSync()
    with guard:
        for _ in range(2):
            train_step(model, optimizer, view1, view2, cfg, accelerator)
    if accelerator.is_main_process:
        out.write_text(f"{guard.ops}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "plain")

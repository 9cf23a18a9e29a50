"""A few SimCLR training steps on a fixed global batch, in 1 process or under torchrun (gloo), with the
product's own builders (model with global BN, LARS, schedule, loss). Saves the final state dict.

    python tests/distributed_steps.py OUT.pt
    torchrun --nproc_per_node 2 tests/distributed_steps.py OUT.pt
"""

import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simclr_dali.trainer.build import build_model, prepare_for_training  # noqa: E402
from simclr_dali.trainer.config import ModelConfig, TrainConfig  # noqa: E402
from simclr_dali.trainer.optim import build_optimizer, build_scheduler  # noqa: E402
from simclr_dali.trainer.step import train_step  # noqa: E402

GLOBAL_BATCH, STEPS = 8, 3

accelerator = Accelerator(cpu=True)
# SIMCLR_TEST_BACKBONE: another timm model (e.g. one made of BatchNormAct2d layers); default a narrow ResNet-18.
BACKBONE = os.environ.get("SIMCLR_TEST_BACKBONE", "")
model_fields = (
    {"backbone": BACKBONE}
    if BACKBONE
    else {"backbone": "resnet18", "cifar_stem": True, "timm_kwargs": {"channels": [8, 16, 32, 64]}}
)
SIZE = 32 if BACKBONE else 16
cfg = TrainConfig(
    train_shards="unused",
    model=ModelConfig(**model_fields, proj_hidden=32, proj_dim=16),
    batch_size=GLOBAL_BATCH,
    lr=0.5,
    temperature=0.2,
    precision="no",
    sync_bn=True,
)
world, rank = accelerator.num_processes, accelerator.process_index
torch.manual_seed(0)
model = build_model(cfg, "cpu", world)
optimizer = build_optimizer(model, cfg)
scheduler = build_scheduler(optimizer, total_steps=10, warmup_steps=2)
model, optimizer = prepare_for_training(accelerator, model, optimizer)
inputs = torch.Generator().manual_seed(1)
local = GLOBAL_BATCH // world
for step in range(STEPS):
    view1, view2 = (torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=inputs) for _ in range(2))
    view1, view2 = (
        view1[rank * local : (rank + 1) * local],
        view2[rank * local : (rank + 1) * local],
    )
    train_step(
        model,
        optimizer,
        view1.contiguous(memory_format=torch.channels_last),
        view2.contiguous(memory_format=torch.channels_last),
        cfg,
        accelerator,
    )
    scheduler.step_update(step + 1)
if accelerator.is_main_process:
    torch.save(accelerator.unwrap_model(model).state_dict(), sys.argv[1])

"""Global BN on CUDA with a timm model whose norm layers are ``BatchNormAct2d``: one process on the whole batch
(plain batch norm: full-batch statistics) against torchrun ranks holding parts of it, converted by
``model.global_bn.convert_to_global_bn`` (``GlobalBatchNormAct``; gloo, every rank on cuda:0, since NCCL
refuses two ranks on one GPU). Saves this rank's outputs, the summed gradients and the running statistics.

    python tests/global_bn_cuda.py OUT_PREFIX
    torchrun --nproc_per_node 2 tests/global_bn_cuda.py OUT_PREFIX
"""

import os
import sys
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from timm.layers import BatchNormAct2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simclr_dali.model.global_bn import GlobalBatchNormAct, convert_to_global_bn  # noqa: E402

MODEL, GLOBAL_BATCH, SIDE = "mobilenetv3_small_050", 16, 64
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = (
    False  # exact fp32 comparisons
)
world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
device = torch.device("cuda", 0)
torch.manual_seed(0)
model = timm.create_model(MODEL, num_classes=0, drop_rate=0.0, drop_path_rate=0.0).to(device)
norm_act = [type(m.act) for m in model.modules() if isinstance(m, BatchNormAct2d)]
assert norm_act, f"{MODEL} has no BatchNormAct2d layer"
if world > 1:
    dist.init_process_group("gloo")
    model = convert_to_global_bn(model, "cuda")
    converted = [type(m.act) for m in model.modules() if isinstance(m, GlobalBatchNormAct)]
    assert converted == norm_act, (
        f"conversion lost norm+act layers or their activations: {converted} vs {norm_act}"
    )
model.train()
inputs = torch.Generator().manual_seed(1)
images = torch.randn(GLOBAL_BATCH, 3, SIDE, SIDE, generator=inputs)
weights = torch.randn(model.num_features, generator=inputs).to(device)
local = GLOBAL_BATCH // world
features = model(images[rank * local : (rank + 1) * local].to(device))
loss = (features @ weights).sum() / GLOBAL_BATCH  # this rank's share of the global-batch loss
loss.backward()
grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
if world > 1:
    for grad in grads.values():
        dist.all_reduce(grad)
running = {name: b.detach().clone() for name, b in model.named_buffers() if "running" in name}
torch.save(
    {
        "rank": rank,
        "features": features.detach().cpu(),
        "grads": {k: v.cpu() for k, v in grads.items()},
        "running": {k: v.cpu() for k, v in running.items()},
        "norm_act_layers": len(norm_act),
    },
    f"{sys.argv[1]}.rank{rank}.pt",
)
if world > 1:
    dist.destroy_process_group()

"""GPU-only paths (marked gpu; skipped without CUDA): global BN with timm's norm+activation layers on CUDA, and
bf16 autocast end to end (the model in bf16, the loss and the gradients in fp32, train.py with the DALI GPU
loader). ``bench.py gpu-check`` runs these with every other GPU-marked test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, make_shards

pytestmark = pytest.mark.gpu


def test_global_bn_on_cuda_matches_one_process_with_batchnormact_layers(tmp_path):
    script = ROOT / "tests" / "global_bn_cuda.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one")],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path / "two"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = torch.load(tmp_path / "one.rank0.pt")
    ranks = [torch.load(tmp_path / f"two.rank{r}.pt") for r in (0, 1)]
    assert one["norm_act_layers"] > 0
    torch.testing.assert_close(
        torch.cat([r["features"] for r in ranks]), one["features"], rtol=1e-4, atol=1e-5
    )
    for name, grad in one["grads"].items():
        torch.testing.assert_close(
            ranks[0]["grads"][name], grad, rtol=1e-3, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
    for name, stat in one["running"].items():
        if stat.is_floating_point():
            torch.testing.assert_close(
                ranks[0]["running"][name],
                stat,
                rtol=1e-4,
                atol=1e-6,
                msg=lambda m, n=name: f"{n}: {m}",
            )


def test_bf16_autocast_runs_the_model_in_bf16_and_the_loss_in_fp32():
    from simclr_dali.model.ntxent import nt_xent
    from simclr_dali.pipeline.augment_config import AugmentConfig
    from simclr_dali.trainer.build import build_model
    from simclr_dali.trainer.config import ModelConfig, TrainConfig

    cfg = TrainConfig(
        train_shards="unused",
        model=ModelConfig(
            backbone="resnet18",
            cifar_stem=True,
            timm_kwargs={"channels": [16, 32, 64, 128]},
            proj_hidden=64,
            proj_dim=32,
        ),
        augment=AugmentConfig(size=32),
        batch_size=64,
        temperature=0.2,
    )
    torch.manual_seed(0)
    model = build_model(cfg, "cuda", 1).cuda()
    seen = []
    model.backbone.conv1.register_forward_hook(
        lambda module, inputs, output: seen.append(output.dtype)
    )
    views = torch.randn(2 * cfg.batch_size, 3, 32, 32, device="cuda").contiguous(
        memory_format=torch.channels_last
    )

    def loss_of(autocast: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            _, z = model(views)
        z1, z2 = z.float().chunk(2)
        loss = nt_xent(z1, z2, cfg.temperature)
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_fp32, grads_fp32 = loss_of(False)
    loss_bf16, grads_bf16 = loss_of(True)
    assert seen == [torch.float32, torch.bfloat16]
    assert loss_bf16.dtype == torch.float32 and torch.isfinite(loss_bf16)
    assert abs(loss_bf16.item() - loss_fp32.item()) < 3e-2 * abs(loss_fp32.item())
    for name, grad in grads_bf16.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])
    assert torch.nn.functional.cosine_similarity(flat(grads_bf16), flat(grads_fp32), dim=0) > 0.95


def test_train_py_bf16_with_the_dali_gpu_loader(tmp_path):
    shards, _ = make_shards(tmp_path / "shards", 160, per_shard=80)
    config = {
        "train_shards": str(shards),
        "image_size": 32,
        "augment": "cifar",
        "backbone": "resnet18",
        "cifar_stem": True,
        "timm_kwargs": {"channels": [16, 32, 64, 128]},
        "proj_hidden": 64,
        "proj_dim": 32,
        "batch_size": 32,
        "epochs": 3,
        "warmup_epochs": 1,
        "lr": 0.5,
        "temperature": 0.2,
        "precision": "bf16",
        "data_device": "gpu",
        "tracker": "none",
        "log_every": 2,
        "checkpoint_every": None,
        "max_steps": 8,
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "train.py", "--config", str(tmp_path / "run.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on cuda, data on gpu" in result.stdout
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert (
        summary["steps"] == 8
        and summary["mean_images_per_s"] > 0
        and 0 <= summary["data_wait_fraction"] <= 1
    )

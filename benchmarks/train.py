"""`bench.py train`: training throughput of the same model and batch fed three ways, in one run:

(a) ``synthetic``: two fixed random views already on the device (the model-only upper bound);
(b) ``dali``: the project's DALI loader end to end (decode + two SimCLR views on the device);
(c) ``torchvision``: a torchvision-transforms pipeline in a torch DataLoader (as many workers as cores).

Reports steps/s, images/s and the data-wait fraction of each, and ``pipeline_efficiency`` = (b)/(a):
1.0 means the pipeline never starves the model. The step is train.py's: the product's model builder,
optimiser (LARS), NT-Xent and, on CUDA, bf16 autocast and channels-last.

Presets: ``imagenet`` (ResNet-50, 224 px, batch 256, the ImageNet-sample shards of `bench.py pipeline`)
for a GPU; ``cifar`` (configs/cifar10_cpu.yaml's model, 32 px, batch 256, CIFAR-10 shards) for the CPU.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from .common import ROOT, write_result
from .pipeline import cifar_shards, imagenet_shards

PRESETS = {
    "imagenet": {"config": None, "overrides": {"backbone": "resnet50", "image_size": 224, "augment": "imagenet"},
                 "pipeline": "imagenet224", "batch_size": 256},
    "cifar": {"config": ROOT / "configs" / "cifar10_cpu.yaml", "overrides": {}, "pipeline": "cifar32", "batch_size": 256},
}


def build(preset: dict, batch_size: int, device: str):
    from accelerate import Accelerator

    from trainer.build import build_model, build_optimizer, build_scheduler
    from trainer.config import load_config

    overrides = {**preset["overrides"], "batch_size": batch_size, "train_shards": "unused", "precision": "bf16" if device == "cuda" else "no"}
    cfg = load_config(preset["config"], overrides)
    accelerator = Accelerator(mixed_precision=cfg.precision, cpu=device == "cpu")
    model = build_model(cfg, accelerator.device.type, 1)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, total_steps=10_000, warmup_steps=10)
    model, optimizer = accelerator.prepare(model, optimizer)
    return cfg, accelerator, model, optimizer, scheduler


def measure(batches, cfg, accelerator, model, optimizer, steps: int, warmup: int) -> dict:
    from trainer.build import simclr_loss
    from trainer.meters import StepTimer

    iterator = iter(batches)
    timer = StepTimer(images_per_step=cfg.batch_size)
    on_gpu = accelerator.device.type == "cuda"
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            if on_gpu:
                torch.cuda.synchronize()
            timer = StepTimer(images_per_step=cfg.batch_size)
            start = time.perf_counter()
        timer.start_wait()
        view1, view2 = next(iterator)
        timer.end_wait()
        with accelerator.autocast():
            loss, _, _ = simclr_loss(model, view1, view2, cfg)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.end_step()
    loss.item()  # the last step's work has finished
    elapsed = time.perf_counter() - start
    summary = timer.summary()
    return {"steps_per_s": steps / elapsed, "images_per_s": steps * cfg.batch_size / elapsed,
            "data_wait_fraction": summary["data_wait_fraction"], "steps": steps, "seconds": round(elapsed, 2)}


def synthetic_batches(cfg, device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    views = [torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=generator).to(device)
             .contiguous(memory_format=torch.channels_last) for _ in range(2)]
    while True:
        yield views[0], views[1]


def dali_batches(shards, cfg, device, threads):
    from pipeline.augment import AugmentConfig
    from pipeline.loader import PretrainLoader

    augment = AugmentConfig.cifar(size=cfg.image_size) if cfg.augment == "cifar" else AugmentConfig(size=cfg.image_size)
    loader = PretrainLoader(shards, cfg.batch_size, augment, device="gpu" if device.type == "cuda" else "cpu", num_threads=threads,
                            dtype=torch.float16 if device.type == "cuda" else torch.float32)
    while True:
        yield from loader


def torchvision_batches(shards, cfg, device, workers):
    from pipeline.augment import AugmentConfig
    from pipeline.torchvision_baseline import TorchvisionPretrainLoader

    augment = AugmentConfig.cifar(size=cfg.image_size) if cfg.augment == "cifar" else AugmentConfig(size=cfg.image_size)
    loader = TorchvisionPretrainLoader(shards, cfg.batch_size, augment, device=str(device), num_workers=workers)
    while True:
        yield from loader


def main(argv=None, result_name: str = "train") -> dict:
    parser = argparse.ArgumentParser(prog=f"bench.py {result_name}", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="imagenet" if torch.cuda.is_available() else "cifar")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="measured steps per feed (default 50 on a GPU, 20 on the CPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--feeds", nargs="+", default=["synthetic", "dali", "torchvision"], choices=["synthetic", "dali", "torchvision"])
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = PRESETS[args.preset]
    steps = args.steps or (50 if device == "cuda" else 20)
    cfg, accelerator, model, optimizer, _ = build(preset, args.batch_size or preset["batch_size"], device)
    shards, description = imagenet_shards() if preset["pipeline"] == "imagenet224" else cifar_shards()
    results = {}
    for feed in args.feeds:
        if feed == "synthetic":
            batches = synthetic_batches(cfg, accelerator.device)
        elif feed == "dali":
            batches = dali_batches(shards, cfg, accelerator.device, args.cores)
        else:
            batches = torchvision_batches(shards, cfg, accelerator.device, args.cores)
        results[feed] = measure(batches, cfg, accelerator, model, optimizer, steps, args.warmup)
        print(f"{feed:>12}: {results[feed]['images_per_s']:8.1f} images/s, {results[feed]['steps_per_s']:.3f} steps/s, "
              f"data-wait {results[feed]['data_wait_fraction']:.1%}")
    payload = {"preset": args.preset, "model": cfg.backbone, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
               "precision": cfg.precision, "data": description, "results": results}
    if "synthetic" in results and "dali" in results:
        payload["pipeline_efficiency"] = results["dali"]["images_per_s"] / results["synthetic"]["images_per_s"]
        print(f"pipeline efficiency (dali / synthetic): {payload['pipeline_efficiency']:.3f}")
    if "torchvision" in results and "dali" in results:
        payload["dali_over_torchvision"] = results["dali"]["images_per_s"] / results["torchvision"]["images_per_s"]
    path = write_result(f"{result_name}_{args.preset}", payload, args.json)
    print(f"wrote {path}")
    return payload


def model_main(argv=None) -> dict:
    """`bench.py model`: the model alone (synthetic device-resident input), the upper bound of `bench.py train`."""
    return main(["--feeds", "synthetic", *(argv or [])], result_name="model")


if __name__ == "__main__":
    main()

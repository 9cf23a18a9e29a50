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

import json
import os
import time
from pathlib import Path

import torch

from common.cli import ArgumentParser

from .common import ROOT, write_result
from .pipeline import cifar_shards, imagenet_shards

PRESETS = {
    "imagenet": {"config": None, "overrides": {"backbone": "resnet50", "image_size": 224, "augment": "imagenet"},
                 "pipeline": "imagenet224", "batch_size": 256},
    "cifar": {"config": ROOT / "configs" / "cifar10_cpu.yaml", "overrides": {}, "pipeline": "cifar32", "batch_size": 256},
}


def build(preset: dict, batch_size: int, device: str, shards: Path, extra: dict | None = None):
    """The preset's TrainConfig, an Accelerator, and the product's model and optimiser (as train.py builds them)."""
    from accelerate import Accelerator

    from trainer.build import build_model, prepare_for_training
    from trainer.config import load_config
    from trainer.optim import build_optimizer

    overrides = {**preset["overrides"], "batch_size": batch_size, "train_shards": str(shards),
                 "precision": "bf16" if device == "cuda" else "no", **(extra or {})}
    cfg = load_config(preset["config"], overrides)
    accelerator = Accelerator(mixed_precision=cfg.precision, cpu=device == "cpu")
    model, optimizer = build_model(cfg, accelerator.device.type, 1), None
    optimizer = build_optimizer(model, cfg)
    model, optimizer = prepare_for_training(accelerator, model, optimizer)
    return cfg, accelerator, model, optimizer


def measure(batches, cfg, accelerator, model, optimizer, steps: int, warmup: int) -> dict:
    """Steps/s, images/s and the data-wait fraction over ``steps`` of train.py's step after ``warmup`` steps."""
    from trainer.meters import StepTimer
    from trainer.step import train_step

    iterator = iter(batches)
    timer = StepTimer(images_per_step=cfg.batch_size, device=accelerator.device)
    on_gpu = accelerator.device.type == "cuda"
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            if on_gpu:
                torch.cuda.synchronize()
            timer = StepTimer(images_per_step=cfg.batch_size, device=accelerator.device)
            start = time.perf_counter()
        timer.start_wait()
        view1, view2 = next(iterator)
        timer.end_wait()
        out = train_step(model, optimizer, view1, view2, cfg, accelerator)
        timer.end_step()
    out.loss.item()  # the last step's work has finished
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


def loader_batches(cfg, device, loader: str):
    """Endless batches from train.py's own loader factory ('dali' or the 'torchvision' baseline)."""
    from trainer.data import build_train_loader

    batches = build_train_loader(cfg, device, loader=loader)
    while True:
        yield from batches


def main(argv=None, result_name: str = "train") -> dict:
    parser = ArgumentParser(prog=f"bench.py {result_name}", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="imagenet" if torch.cuda.is_available() else "cifar")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="measured steps per feed (default 50 on a GPU, 20 on the CPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--feeds", nargs="+", default=["synthetic", "dali", "torchvision"], choices=["synthetic", "dali", "torchvision"])
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--shards", default=None, help="training shards (default: the preset's, written once)")
    parser.add_argument("--overrides", type=json.loads, default=None,
                        help='config fields as JSON, e.g. \'{"backbone": "resnet18"}\'')
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = PRESETS[args.preset]
    steps = args.steps or (50 if device == "cuda" else 20)
    if args.shards:
        shards, description = Path(args.shards), f"shards {args.shards}"
    else:
        shards, description = imagenet_shards() if preset["pipeline"] == "imagenet224" else cifar_shards()
    batch_size = args.batch_size or preset["batch_size"]
    cfg, accelerator, model, optimizer = build(preset, batch_size, device, shards, args.overrides)
    cfg.data_threads = args.cores
    results = {}
    for feed in args.feeds:
        if feed == "synthetic":
            batches = synthetic_batches(cfg, accelerator.device)
        else:
            batches = loader_batches(cfg, accelerator.device, feed)
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

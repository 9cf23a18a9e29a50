"""`bench.py train`: training throughput of the same model and batch fed three ways, in one run:

(a) ``synthetic``: two fixed random views already on the device (the model-only upper bound);
(b) ``dali``: the project's DALI loader end to end (decode + two SimCLR views on the device);
(c) ``torchvision``: a torchvision-transforms pipeline in a torch DataLoader (as many workers as cores).

Reports steps/s, images/s and the data-wait fraction of each, and ``pipeline_efficiency`` = (b)/(a):
1.0 means the pipeline never starves the model. The step is train.py's: the product's model builder,
optimiser (LARS), NT-Xent and, on CUDA, bf16 autocast and channels-last.

Presets: ``imagenet`` (ResNet-50, 224 px, batch 256, the ImageNet-sample shards of `bench.py pipeline`)
for a GPU; ``cifar`` (configs/cifar10_cpu.yaml's model, 32 px, batch 256, CIFAR-10 shards) for the CPU.
``--micro_batch M`` runs every feed with gradient caching (train.py's ``--micro_batch``).

Memory column (``--configs B[:M] ...``, e.g. ``--configs 256 512 4096:256``): each global batch B (with
micro-batches of M images per view) runs the synthetic feed in a fresh subprocess that reports the time per
image over ``--timed_images`` images (after ``--warmup_images``) and the peak memory of one more step:
- CUDA: ``torch.cuda.max_memory_allocated()`` over the step (peak reset before it), and that minus
  ``torch.cuda.memory_allocated()`` before it;
- CPU: as `bench.py loss` measures it (bench/loss.py): glibc malloc set to mmap every block >= 64 KiB and
  unmap it at free, the peak reset (``/proc/self/clear_refs``), then VmHWM after the step (the process's
  peak resident set: libraries, model, optimiser state, the batch's views and the step) and VmHWM - VmRSS
  before it (what the step adds to the resident model, optimiser state and views).
Ratios are against the first configuration; written to bench/results/train_microbatch_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..common.cli import ArgumentParser
from .common import ROOT, write_result
from .pipeline import cifar_shards, imagenet_shards

PRESETS = {
    "imagenet": {
        "config": None,
        "overrides": {"backbone": "resnet50", "image_size": 224, "augment": "imagenet"},
        "pipeline": "imagenet224",
        "batch_size": 256,
    },
    "cifar": {
        "config": ROOT / "configs" / "cifar10_cpu.yaml",
        "overrides": {},
        "pipeline": "cifar32",
        "batch_size": 256,
    },
}


def build(preset: dict, batch_size: int, device: str, shards: Path, extra: dict | None = None):
    """The preset's TrainConfig, an Accelerator, and the product's model and optimiser (as train.py builds them)."""
    from accelerate import Accelerator

    from ..trainer.build import build_model, prepare_for_training
    from ..trainer.config import load_config
    from ..trainer.optim import build_optimizer

    overrides = {
        **preset["overrides"],
        "batch_size": batch_size,
        "train_shards": str(shards),
        "precision": "bf16" if device == "cuda" else "no",
        **(extra or {}),
    }
    cfg = load_config(preset["config"], overrides)
    accelerator = Accelerator(mixed_precision=cfg.precision, cpu=device == "cpu")
    model = build_model(cfg, accelerator.device.type, 1)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = prepare_for_training(accelerator, model, optimizer)
    return cfg, accelerator, model, optimizer


def measure(batches, cfg, accelerator, model, optimizer, steps: int, warmup: int) -> dict:
    """Steps/s, images/s and the data-wait fraction over ``steps`` of train.py's step after ``warmup`` steps."""
    from ..trainer.meters import StepTimer
    from ..trainer.step import train_step

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
        view1, view2, *labels = next(iterator)  # labels: from labelled shards (SupCon)
        timer.end_wait()
        out = train_step(model, optimizer, view1, view2, cfg, accelerator, *labels)
        timer.end_step()
    out.loss.item()  # the last step's work has finished
    elapsed = time.perf_counter() - start
    summary = timer.summary()
    return {
        "steps_per_s": steps / elapsed,
        "images_per_s": steps * cfg.batch_size / elapsed,
        "data_wait_fraction": summary["data_wait_fraction"],
        "steps": steps,
        "seconds": round(elapsed, 2),
    }


def synthetic_batches(cfg, device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    views = [
        torch.randn(cfg.batch_size, 3, cfg.augment.size, cfg.augment.size, generator=generator)
        .to(device)
        .contiguous(memory_format=torch.channels_last)
        for _ in range(2)
    ]
    while True:
        yield views[0], views[1]


def loader_batches(cfg, device, loader: str):
    """Endless batches from train.py's own loader factory ('dali' or the 'torchvision' baseline)."""
    from ..trainer.data import build_train_loader

    batches = build_train_loader(cfg, device, loader=loader)
    while True:
        yield from batches


def parse_configuration(text: str) -> tuple[int, int | None]:
    """'4096:256' -> (4096, 256); '512' -> (512, None)."""
    batch, _, micro = text.partition(":")
    try:
        return int(batch), (int(micro) if micro else None)
    except ValueError:
        raise SystemExit(
            f"--configs: {text!r} is not BATCH or BATCH:MICRO_BATCH (e.g. 4096:256)"
        ) from None


def measure_configuration(
    preset_name: str,
    batch_size: int,
    micro_batch: int | None,
    timed_images: int,
    warmup_images: int,
) -> dict:
    """In this (fresh) process: time per image of train.py's step on the synthetic feed, then the peak
    memory of one more step (see the module docstring)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, accelerator, model, optimizer = build(
        PRESETS[preset_name], batch_size, device, Path("unused"), {"micro_batch": micro_batch}
    )
    steps, warmup = (
        max(2, math.ceil(timed_images / batch_size)),
        max(1, math.ceil(warmup_images / batch_size)),
    )
    timing = measure(
        synthetic_batches(cfg, accelerator.device),
        cfg,
        accelerator,
        model,
        optimizer,
        steps,
        warmup,
    )
    view1, view2 = next(synthetic_batches(cfg, accelerator.device))

    def step():
        from ..trainer.step import train_step

        train_step(model, optimizer, view1, view2, cfg, accelerator).loss.item()

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
        memory = {"peak_bytes": peak, "step_extra_bytes": peak - before}
    else:
        from .loss import _cpu_peak_extra, _proc_status_kib

        extra = _cpu_peak_extra(step)
        memory = {"peak_bytes": 1024 * _proc_status_kib("VmHWM"), "step_extra_bytes": extra}
    return {
        "batch_size": batch_size,
        "micro_batch": micro_batch or 0,
        "model": cfg.model.backbone,
        "widths": cfg.model.timm_kwargs.get("channels"),
        "image_size": cfg.augment.size,
        "precision": cfg.precision,
        "ms_per_image": 1e3 / timing["images_per_s"],
        **timing,
        **memory,
        "peak_mib": memory["peak_bytes"] / 2**20,
        "step_extra_mib": memory["step_extra_bytes"] / 2**20,
    }


def memory_sweep(
    preset_name: str,
    configurations: list[str],
    timed_images: int,
    warmup_images: int,
    json_path: str | None,
    timeout_s: float = 3600,
) -> dict:
    """One fresh subprocess per configuration; the table, ratios against the first configuration, the JSON."""
    rows = []
    for text in configurations:
        batch_size, micro_batch = parse_configuration(text)
        spec = json.dumps(
            {
                "preset_name": preset_name,
                "batch_size": batch_size,
                "micro_batch": micro_batch,
                "timed_images": timed_images,
                "warmup_images": warmup_images,
            }
        )
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            ),
        }
        proc = subprocess.run(
            [sys.executable, "-m", "simclr_dali.bench.train", "--child", spec],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        result = next(
            (
                json.loads(line[7:])
                for line in proc.stdout.splitlines()
                if line.startswith("RESULT ")
            ),
            None,
        )
        if result is None:
            raise SystemExit(
                f"configuration {text} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
            )
        rows.append(result)
        print(
            f"batch {batch_size:6d}  micro-batch {micro_batch or '-':>5}: {result['ms_per_image']:7.3f} ms/image, "
            f"peak {result['peak_mib']:8.1f} MiB, step adds {result['step_extra_mib']:8.1f} MiB",
            flush=True,
        )
    base = rows[0]
    for row in rows:
        row["vs_first"] = {
            "ms_per_image": row["ms_per_image"] / base["ms_per_image"],
            "peak": row["peak_bytes"] / base["peak_bytes"],
            "step_extra": row["step_extra_bytes"] / base["step_extra_bytes"],
        }
    print(
        f"\n{'configuration':>22} {'ms/image':>9} {'x':>6} {'peak MiB':>9} {'x':>6} {'step MiB':>9} {'x':>6}"
    )
    for row in rows:
        name = f"{row['batch_size']}" + (
            f" (M={row['micro_batch']})" if row["micro_batch"] else " (plain)"
        )
        ratio = row["vs_first"]
        print(
            f"{name:>22} {row['ms_per_image']:9.3f} {ratio['ms_per_image']:6.2f} "
            f"{row['peak_mib']:9.1f} {ratio['peak']:6.2f} "
            f"{row['step_extra_mib']:9.1f} {ratio['step_extra']:6.2f}"
        )
    preset = PRESETS[preset_name]
    payload = {
        "preset": preset_name,
        "config": str(preset["config"].relative_to(ROOT)) if preset["config"] else None,
        "model": rows[0]["model"],
        "widths": rows[0]["widths"],
        "image_size": rows[0]["image_size"],
        "feed": "synthetic",
        "timed_images": timed_images,
        "warmup_images": warmup_images,
        "memory_method": __doc__.split("Memory column", 1)[1].split("Ratios", 1)[0].strip(),
        "results": rows,
    }
    path = write_result(f"train_microbatch_{preset_name}", payload, json_path)
    print(f"wrote {path}")
    return payload


def _parser(result_name: str) -> ArgumentParser:
    """The flags of `bench.py train` (and of `bench.py model`, which fixes --feeds)."""
    parser = ArgumentParser(prog=f"bench.py {result_name}", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="imagenet" if torch.cuda.is_available() else "cifar",
    )
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="measured steps per feed (default 50 on a GPU, 20 on the CPU)",
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--feeds",
        nargs="+",
        default=["synthetic", "dali", "torchvision"],
        choices=["synthetic", "dali", "torchvision"],
    )
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--shards", default=None, help="training shards (default: the preset's, written once)"
    )
    parser.add_argument(
        "--overrides",
        type=json.loads,
        default=None,
        help='config fields as JSON, e.g. \'{"backbone": "resnet18"}\'',
    )
    parser.add_argument(
        "--micro_batch",
        type=int,
        default=None,
        help="gradient caching: images per view per micro-batch (train.py's flag)",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=None,
        metavar="B[:M]",
        help="memory column: time per image and peak step memory of each global batch B (micro-batch M), each in a "
        "fresh process on the synthetic feed, e.g. 256 512 4096:256",
    )
    parser.add_argument(
        "--timed_images",
        type=int,
        default=8192,
        help="--configs: images timed per configuration (>= 2 steps)",
    )
    parser.add_argument(
        "--warmup_images",
        type=int,
        default=1024,
        help="--configs: warm-up images per configuration (>= 1 step)",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def main(argv=None, result_name: str = "train") -> dict:
    """CLI of `bench.py train`: images/s of training steps per feed (or the memory sweep), JSON written."""
    args = _parser(result_name).parse_args(argv)
    if args.child:  # one --configs entry in a fresh process
        print("RESULT " + json.dumps(measure_configuration(**json.loads(args.child))), flush=True)
        return {}
    if args.configs:
        return memory_sweep(
            args.preset, args.configs, args.timed_images, args.warmup_images, args.json
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = PRESETS[args.preset]
    steps = args.steps or (50 if device == "cuda" else 20)
    if args.shards:
        shards, description = Path(args.shards), f"shards {args.shards}"
    else:
        shards, description = (
            imagenet_shards() if preset["pipeline"] == "imagenet224" else cifar_shards()
        )
    batch_size = args.batch_size or preset["batch_size"]
    cfg, accelerator, model, optimizer = build(
        preset,
        batch_size,
        device,
        shards,
        {**(args.overrides or {}), "micro_batch": args.micro_batch},
    )
    cfg.loader.threads = args.cores
    results = {}
    for feed in args.feeds:
        if feed == "synthetic":
            batches = synthetic_batches(cfg, accelerator.device)
        else:
            batches = loader_batches(cfg, accelerator.device, feed)
        results[feed] = measure(batches, cfg, accelerator, model, optimizer, steps, args.warmup)
        print(
            f"{feed:>12}: {results[feed]['images_per_s']:8.1f} images/s, {results[feed]['steps_per_s']:.3f} steps/s, "
            f"data-wait {results[feed]['data_wait_fraction']:.1%}"
        )
    payload = {
        "preset": args.preset,
        "model": cfg.model.backbone,
        "image_size": cfg.augment.size,
        "batch_size": cfg.batch_size,
        "micro_batch": cfg.micro_batch,
        "precision": cfg.precision,
        "data": description,
        "results": results,
    }
    if "synthetic" in results and "dali" in results:
        payload["pipeline_efficiency"] = (
            results["dali"]["images_per_s"] / results["synthetic"]["images_per_s"]
        )
        print(f"pipeline efficiency (dali / synthetic): {payload['pipeline_efficiency']:.3f}")
    if "torchvision" in results and "dali" in results:
        payload["dali_over_torchvision"] = (
            results["dali"]["images_per_s"] / results["torchvision"]["images_per_s"]
        )
    path = write_result(f"{result_name}_{args.preset}", payload, args.json)
    print(f"wrote {path}")
    return payload


def model_main(argv=None) -> dict:
    """`bench.py model`: the model alone (synthetic device-resident input), the upper bound of `bench.py train`."""
    return main(["--feeds", "synthetic", *(argv or [])], result_name="model")


if __name__ == "__main__":
    main()

"""`bench.py pipeline`: images/s of two SimCLR views, the project's DALI loader against a torchvision
pipeline fed by a torch DataLoader, on the same machine, the same shards, in one run.

Presets:
- ``imagenet224``: the 1,000 full-size ImageNet JPEGs of ../shared/data/imagenet-sample (sides 68 to
  2,400 px), repeated 5 times so an epoch is long enough, 224 px views, the paper's ImageNet settings;
- ``cifar32``: CIFAR-10's 50,000 training JPEGs (../shared/data/cifar10/train), 32 px, the CIFAR preset.
Without ../shared/data a preset falls back to generated images, and says so in the result.

Both sides get the same cores: DALI ``num_threads`` = cores in all (the training loader's default: one
pipeline of that many threads), DataLoader ``num_workers`` = cores; the
same augmentation parameters (crop area [0.08, 1] and aspect [3/4, 4/3], bicubic; flip 0.5; colour
jitter p=0.8 with strength s; grayscale p=0.2; blur p=0.5, sigma [0.1, 2], 23 taps at 224 px;
normalisation); the same shard files (torchvision reads them with the ``webdataset`` library). The
clock runs after a warm-up, over whole batches delivered as torch tensors on the training device.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ..common.cli import ArgumentParser
from .common import ROOT, write_result, write_ten_class_shards

SHARED_DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / "data" / "bench"
PRESETS = {
    "imagenet224": {"size": 224, "cifar": False, "batch_size": 64},
    "cifar32": {"size": 32, "cifar": True, "batch_size": 256},
}


# ------------------------------------------------------------------ data


def imagenet_shards(
    repeats: int = 5, source: Path | None = None, out: Path | None = None
) -> tuple[Path, str]:
    """The ImageNet sample (``source``, default ../shared/data/imagenet-sample) as shards, written once to
    ``out`` (default under data/bench/)."""
    from ..pipeline.shards.writer import Sample, write_shards

    out = out or CACHE / f"imagenet-sample-x{repeats}"
    if (out / "classes.json").exists():
        return out, f"../shared/data/imagenet-sample x{repeats}"
    source = source or SHARED_DATA / "imagenet-sample"
    if source.is_dir():
        files = sorted(source.glob("*.JPEG"))
        label = (
            "../shared/data/imagenet-sample"
            if source == SHARED_DATA / "imagenet-sample"
            else str(source)
        )
        description = f"{label} ({len(files)} full-size JPEGs) x{repeats}"
        samples = (
            Sample(f"{r:02d}{i:06d}", path.read_bytes(), i, str(path))
            for r in range(repeats)
            for i, path in enumerate(files)
        )
        classes = [path.stem.split("_", 1)[0] for path in files]
        write_shards(
            samples, str(out / "train-%06d.tar"), classes, len(files) * repeats, max_count=1000
        )
        return out, description
    return synthetic_shards(out, 5000, 500, "generated 500x375 images (../shared/data absent)")


def cifar_shards() -> tuple[Path, str]:
    from ..pipeline.shards.source_writer import write_source
    from ..pipeline.shards.sources import folder_source

    out = CACHE / "cifar10-train"
    if (out / "classes.json").exists():
        return out, "../shared/data/cifar10/train (50,000 32x32 JPEGs)"
    source = SHARED_DATA / "cifar10" / "train"
    if source.is_dir():
        # 10,000 per shard: the layout the recorded results were measured on (the writer's default is 1,000)
        write_source(
            folder_source(source),
            str(out / "train-%06d.tar"),
            max_count=10_000,
            workers=len(os.sched_getaffinity(0)),
        )
        return out, "../shared/data/cifar10/train (50,000 32x32 JPEGs)"
    return synthetic_shards(out, 20000, 32, "generated 32x32 images (../shared/data absent)")


def synthetic_shards(out: Path, count: int, side: int, description: str) -> tuple[Path, str]:
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (count, 8, 8, 3)).astype(np.uint8)
    images = np.stack(
        [
            np.asarray(
                torch.nn.functional.interpolate(
                    torch.from_numpy(c).permute(2, 0, 1)[None].float(),
                    size=(side * 3 // 4, side),
                    mode="bilinear",
                )[0]
                .permute(1, 2, 0)
                .byte()
            )
            for c in coarse
        ]
    )
    write_ten_class_shards(images, out, max_count=2000)
    return out, description


# ------------------------------------------------------------------ the two pipelines


def loader(shards: Path, preset: dict, kind: str, cores: int, device: str):
    """train.py's own loader for the preset ('dali' or the 'torchvision' baseline), ``cores`` DALI threads or
    DataLoader workers."""
    from ..pipeline.augment_config import AugmentConfig
    from ..trainer.config import LoaderConfig, TrainConfig
    from ..trainer.data import build_train_loader

    cfg = TrainConfig(
        train_shards=str(shards),
        augment=AugmentConfig(
            preset="cifar" if preset["cifar"] else "imagenet", size=preset["size"]
        ),
        batch_size=preset["batch_size"],
        loader=LoaderConfig(threads=cores),
    )
    return build_train_loader(cfg, torch.device(device), loader=kind)


def run(shards: Path, preset: dict, kind: str, cores: int, device: str, seconds: float) -> dict:
    batches = loader(shards, preset, kind, cores, device)
    result = _timed(batches, seconds, device == "cuda", restart=lambda: batches)
    return {**result, "dali_pipelines": batches.pipelines} if kind == "dali" else result


def _timed(batches, seconds: float, on_gpu: bool, restart) -> dict:
    """Images/s over whole batches after a warm-up of 5 batches; ``restart`` gives the next epoch's iterable."""
    iterator = iter(batches)

    def next_batch():
        nonlocal iterator
        try:
            return next(iterator)
        except StopIteration:
            iterator = iter(restart())
            return next(iterator)

    for _ in range(5):
        next_batch()
    if on_gpu:
        torch.cuda.synchronize()
    images, batch_times = 0, []
    start = last = time.perf_counter()
    while time.perf_counter() - start < seconds:
        view1, *_ = next_batch()  # (labels too, from labelled shards)
        if on_gpu:
            torch.cuda.synchronize()
        now = time.perf_counter()
        batch_times.append(now - last)
        last = now
        images += view1.shape[0]
    elapsed = time.perf_counter() - start
    return {
        "images_per_s": images / elapsed,
        "views_per_s": 2 * images / elapsed,
        "images": images,
        "seconds": round(elapsed, 2),
        "median_batch_ms": round(1000 * statistics.median(batch_times), 2),
    }


def epoch_stall(shards: Path, preset: dict, cores: int, device: str) -> dict:
    """The DALI loader's epoch boundary: the wait for the first batch of epoch 2 against the median batch
    interval of epoch 1 (a loader that rebuilds its pipeline per epoch waits there for decoder start-up and a
    shuffle-buffer refill)."""
    batches = loader(shards, preset, "dali", cores, device)
    intervals, last = [], time.perf_counter()
    for _ in range(2):  # the clock runs on across the boundary
        for _views in batches:
            if device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            intervals.append(now - last)
            last = now
    steps = len(batches)
    median = statistics.median(intervals[1:steps])
    return {
        "steps_per_epoch": steps,
        "median_batch_s": round(median, 4),
        "first_batch_of_epoch_2_s": round(intervals[steps], 4),
        "stall_s": round(intervals[steps] - median, 4),
    }


# ------------------------------------------------------------------ command line


def _parser() -> ArgumentParser:
    """The flags of `bench.py pipeline` (the S3 ones are read by bench.pipeline_s3)."""
    parser = ArgumentParser(prog="bench.py pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument(
        "--seconds",
        type=float,
        default=30.0,
        help="measured time per pipeline and preset (after warm-up)",
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    parser.add_argument(
        "--cores",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="DALI threads = DataLoader workers",
    )
    parser.add_argument(
        "--imagenet_shards",
        default=None,
        help="shards for imagenet224 (default: the ImageNet sample x5, written once)",
    )
    parser.add_argument(
        "--cifar_shards",
        default=None,
        help="shards for cifar32 (default: CIFAR-10's training JPEGs, written once)",
    )
    parser.add_argument("--batch_size", type=int, default=None, help="default: the preset's")
    parser.add_argument(
        "--runs",
        type=int,
        default=3,
        help="side-by-side runs per preset (the torchvision side varies: report the spread)",
    )
    parser.add_argument(
        "--epoch_stall",
        action="store_true",
        help="also time the DALI loader's epoch boundary (two whole epochs)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="DALI threads to sweep (the DALI side runs once per value; the first is the one compared with "
        "torchvision); default: --cores",
    )
    parser.add_argument("--json", default=None, help="default bench/results/pipeline_<device>.json")
    parser.add_argument(
        "--bucket", default=None, help="s3://BUCKET/PREFIX/: local vs streamed (bench.pipeline_s3)"
    )
    parser.add_argument(
        "--seaweedfs", action="store_true", help="with --bucket: a SeaweedFS on 127.0.0.1"
    )
    parser.add_argument(
        "--delays_ms", type=int, nargs="+", default=[0, 20], help="with --bucket: added latencies"
    )
    return parser


def main(argv=None) -> dict:
    """CLI of `bench.py pipeline`: DALI vs torchvision per preset (or local vs S3 with --bucket), JSON written."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = [args.cores]
    if min(args.threads) < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.bucket:
        from .pipeline_s3 import main_s3

        presets = {
            n: {**PRESETS[n], **({"batch_size": args.batch_size} if args.batch_size else {})}
            for n in args.presets
        }
        return main_s3(args, presets, lambda name: preset_shards(name, args), run)
    results = {}
    for name in args.presets:
        preset = {**PRESETS[name], **({"batch_size": args.batch_size} if args.batch_size else {})}
        shards, description = preset_shards(name, args)
        print(f"[{name}] data: {description}")
        runs = [compare(name, shards, preset, args) for _ in range(args.runs)]
        speedups = [r["speedup"] for r in runs]
        results[name] = {
            "data": description,
            "image_size": preset["size"],
            "batch_size": preset["batch_size"],
            "dali_threads": args.threads[0],
            "dali_threads_swept": args.threads,
            "dataloader_workers": args.cores,
            "runs": runs,
            "speedup": {
                "min": min(speedups),
                "median": statistics.median(speedups),
                "max": max(speedups),
            },
        }
        if len(runs) > 1:
            print(
                f"[{name}] DALI / torchvision over {len(runs)} runs: {min(speedups):.2f}x .. {max(speedups):.2f}x"
            )
        if args.epoch_stall:
            stall = results[name]["epoch_stall"] = epoch_stall(
                shards, preset, args.cores, args.device
            )
            print(
                f"[{name}] epoch boundary: first batch of epoch 2 after {stall['first_batch_of_epoch_2_s']:.3f} s "
                f"(median batch {stall['median_batch_s']:.3f} s)"
            )
    machine = {
        "load_average_at_end": list(os.getloadavg())
    }  # the machine may be shared: how busy it was
    path = write_result(
        "pipeline",
        {
            "device": args.device,
            "seconds_per_measurement": args.seconds,
            "machine": machine,
            "results": results,
        },
        args.json,
    )
    print(f"wrote {path}")
    return results


def preset_shards(name: str, args) -> tuple[Path, str]:
    """The preset's shards: the flag's, else the shared data written once under data/bench/."""
    given = args.imagenet_shards if name == "imagenet224" else args.cifar_shards
    if given:
        return Path(given), f"shards {given}"
    return imagenet_shards() if name == "imagenet224" else cifar_shards()


def compare(name: str, shards: Path, preset: dict, args) -> dict:
    """One side-by-side run: DALI at each of ``args.threads`` threads, then the torchvision DataLoader with
    ``args.cores`` workers, on the same shards; the speedup is DALI's at the first thread count."""
    sweep = {}
    for threads in args.threads:
        sweep[threads] = result = run(shards, preset, "dali", threads, args.device, args.seconds)
        print(
            f"[{name}] DALI ({threads} threads): {result['images_per_s']:8.1f} images/s "
            f"({result['views_per_s']:.0f} views/s)"
        )
    dali = sweep[args.threads[0]]
    tv = run(shards, preset, "torchvision", args.cores, args.device, args.seconds)
    print(
        f"[{name}] torchvision: {tv['images_per_s']:8.1f} images/s ({tv['views_per_s']:.0f} views/s)"
    )
    speedup = round(dali["images_per_s"] / tv["images_per_s"], 3)
    print(f"[{name}] DALI / torchvision = {speedup:.2f}x")
    row = {
        "dali": dali,
        "torchvision": tv,
        "speedup": speedup,
        "load_average": list(os.getloadavg()),
    }
    if len(args.threads) > 1:
        row["dali_by_threads"] = {str(t): r for t, r in sweep.items()}
    return row


if __name__ == "__main__":
    main()

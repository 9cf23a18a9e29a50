"""`bench.py writer`: the shard writer's costs, recorded in bench/results/writer_<device>.json.

    python -m bench.writer storage   # CIFAR raw pixels: JPEG 4:2:0 / 4:4:4 at several qualities vs PNG
    python -m bench.writer rss       # peak RSS of `pipeline.shards.cli write` (main + worker processes)

``storage``: for 32x32 images (the 10,000 CIFAR-10 test images of ../shared/data, decoded to pixels:
already JPEG-coded once, so PSNR is measured against those pixels), each encoding's bytes per image, bytes
per sample in a tar (512-byte header + data padded to 512 bytes), PSNR, and decode cost per image with
DALI's CPU decoder (one thread, batches of 256) and with PIL.

``rss``: runs ``simclr-shards write ...`` as a child and samples the summed RSS of its process
tree (the writer and its spawned workers) every 50 ms; the peak and the sample count are recorded for the
50,000-image CIFAR-10 folder and for a generated folder of 200,000 images (64x64, 1 in 10 a PNG).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..common.cli import ArgumentParser
from .common import ROOT, write_result

SHARED_DATA = ROOT.parent / "shared" / "data"


# ------------------------------------------------------------------ storage of raw-pixel (CIFAR) sources


def cifar_pixels(limit: int = 10_000) -> np.ndarray:
    from PIL import Image

    files = sorted((SHARED_DATA / "cifar10" / "test").glob("*/*.jpg"))[:limit]
    if not files:
        raise SystemExit("needs ../shared/data/cifar10/test")
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def dali_decode_seconds(encoded: list[bytes], batch: int = 256, repeats: int = 3) -> float:
    """Seconds per image for DALI's CPU decoder (one thread), best of ``repeats`` passes."""
    from nvidia.dali import fn, pipeline_def, types

    batches = [encoded[i : i + batch] for i in range(0, len(encoded) - batch + 1, batch)]
    position = [0]

    def source():
        data = batches[position[0] % len(batches)]
        position[0] += 1
        return [np.frombuffer(d, np.uint8) for d in data]

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def decode_pipe():
        return fn.decoders.image(
            fn.external_source(source=source, batch=True), device="cpu", output_type=types.RGB
        )

    pipe = decode_pipe()
    pipe.build()
    pipe.run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in batches:
            pipe.run()
        best = min(best, (time.perf_counter() - start) / (len(batches) * batch))
    return best


def pil_decode_seconds(encoded: list[bytes], repeats: int = 3) -> float:
    from PIL import Image

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for data in encoded:
            Image.open(io.BytesIO(data)).convert("RGB").load()
        best = min(best, (time.perf_counter() - start) / len(encoded))
    return best


def tar_bytes(size: int) -> int:
    return 512 + -(-size // 512) * 512


def storage(args) -> dict:
    from ..pipeline.shards.image_policy import ImagePolicy, prepare_pixels

    pixels = cifar_pixels(args.images)
    options = {
        "jpeg q95 4:2:0 (the old default)": ImagePolicy(95, "420"),
        "jpeg q95 4:4:4": ImagePolicy(95, "444"),
        "jpeg q98 4:4:4": ImagePolicy(98, "444"),
        "jpeg q100 4:4:4": ImagePolicy(100, "444"),
        "png": ImagePolicy(pixel_format="png"),
    }
    results = {}
    for name, policy in options.items():
        encoded = [prepare_pixels(image, policy).data for image in pixels]
        from PIL import Image

        decoded = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in encoded])
        results[name] = {
            "bytes_per_image": float(np.mean([len(d) for d in encoded])),
            "tar_bytes_per_image_member": float(np.mean([tar_bytes(len(d)) for d in encoded])),
            "psnr_db": psnr(pixels, decoded),
            "dali_cpu_decode_us_per_image": 1e6 * dali_decode_seconds(encoded),
            "pil_decode_us_per_image": 1e6 * pil_decode_seconds(encoded),
        }
        row = results[name]
        print(
            f"{name:34s} {row['bytes_per_image']:7.0f} B  tar {row['tar_bytes_per_image_member']:6.0f} B  "
            f"PSNR {row['psnr_db']:6.2f} dB  DALI {row['dali_cpu_decode_us_per_image']:6.1f} us  "
            f"PIL {row['pil_decode_us_per_image']:6.1f} us",
            flush=True,
        )
    return {
        "images": len(pixels),
        "source": "../shared/data/cifar10/test decoded to pixels",
        "encodings": results,
    }


# ------------------------------------------------------------------ writer peak memory


def tree_rss_bytes(pid: int) -> int:
    """Summed RSS of ``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            parent, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += rss.get(current, 0)
        stack += children.get(current, [])
    return total


def peak_rss(command: list[str], interval: float = 0.05, cwd: Path = ROOT) -> dict:
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak, samples = 0, 0
    while process.poll() is None:
        peak = max(peak, tree_rss_bytes(process.pid))
        samples += 1
        time.sleep(interval)
    output = process.stdout.read()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{output}")
    return {
        "command": " ".join(command[1:]),
        "peak_rss_mib": peak / 2**20,
        "rss_samples": samples,
        "seconds": time.perf_counter() - start,
        "output": output.strip().splitlines()[-1],
    }


def generated_folder(root: Path, count: int, side: int = 64) -> Path:
    """``count`` smooth random images as files in 100 nested folders, 1 in 10 a PNG (re-encoded by the writer)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for start in range(0, count, 1000):
        coarse = rng.integers(0, 256, (1000, 4, 4, 3), dtype=np.uint8)
        for offset, small in enumerate(coarse):
            index = start + offset
            folder = root / f"{index % 100:02d}" / f"{index // 100 % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(small).resize((side, side), Image.Resampling.BILINEAR)
            image.save(folder / f"img {index:06d}.{'png' if index % 10 == 0 else 'jpg'}")
    return root


def rss(args) -> dict:
    python = [sys.executable, "-m", "simclr_dali.pipeline.shards.cli"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="writer-rss-") as tmp:
        tmp = Path(tmp)
        cifar = SHARED_DATA / "cifar10" / "train"
        if cifar.is_dir() and not args.generate_only:
            results["cifar10_train_folder_50k"] = peak_rss(
                python
                + [
                    "write",
                    "folder",
                    str(cifar),
                    str(tmp / "cifar" / "train-%06d.tar"),
                    "--quiet",
                    "--workers",
                    str(args.workers),
                ]
            )
            print(results["cifar10_train_folder_50k"], flush=True)
            if args.compare_with:  # the same write by another checkout of the project (e.g. the writer before this one)
                results["cifar10_train_folder_50k_compared"] = {
                    "checkout": str(args.compare_with),
                    **peak_rss(
                        python
                        + [
                            "write",
                            "folder",
                            str(cifar),
                            str(tmp / "before" / "train-%06d.tar"),
                            "--quiet",
                            "--workers",
                            str(args.workers),
                        ],
                        cwd=args.compare_with,
                    ),
                }
                print(results["cifar10_train_folder_50k_compared"], flush=True)
        folder = args.generated_dir or tmp / "generated"
        if not (
            folder / ".complete"
        ).exists():  # generated once; reused when --generated_dir names an earlier folder
            generated_folder(folder, args.generated)
            (folder / ".complete").write_text(str(args.generated))
        if args.generate_only:
            return {}
        results[f"generated_images_{args.generated // 1000}k"] = peak_rss(
            python
            + [
                "write",
                "images",
                str(folder),
                str(tmp / "gen" / "g-%06d.tar"),
                "--quiet",
                "--workers",
                str(args.workers),
            ]
        )
        print(results[f"generated_images_{args.generated // 1000}k"], flush=True)
    return {"workers": args.workers, "runs": results}


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="bench.py writer", description=__doc__)
    parser.add_argument("what", choices=["storage", "rss"])
    parser.add_argument(
        "--images", type=int, default=10_000, help="storage: CIFAR images to encode"
    )
    parser.add_argument(
        "--generated", type=int, default=200_000, help="rss: images in the generated folder"
    )
    parser.add_argument("--workers", type=int, default=2, help="rss: writer worker processes")
    parser.add_argument(
        "--generated_dir",
        type=Path,
        default=None,
        help="rss: keep the generated folder here (reused if complete)",
    )
    parser.add_argument(
        "--generate_only",
        action="store_true",
        help="rss: only generate the folder (no measurement)",
    )
    parser.add_argument(
        "--compare_with",
        type=Path,
        default=None,
        help="rss: another checkout whose writer to measure on the CIFAR folder",
    )
    parser.add_argument(
        "--json",
        default=None,
        help="result file (default bench/results/writer_<what>_<device>.json)",
    )
    args = parser.parse_args(argv)
    payload = storage(args) if args.what == "storage" else rss(args)
    if not payload:
        return
    path = write_result(f"writer_{args.what}", payload, args.json)
    print(f"wrote {path}")
    print(json.dumps(payload, indent=1)[:2000])


if __name__ == "__main__":
    main()

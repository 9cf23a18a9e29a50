"""What every benchmark records beside its numbers: device, versions, command, date."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "accelerate",
    "nvidia-dali-cuda130",
    "nvidia-dali-cuda120",
    "webdataset",
    "triton",
    "pillow",
    "numpy",
    "numba",
)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag() -> str:
    """'cpu' or a short GPU name ('h100', 'a100', ...): the suffix of result files."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4", "a10", "v100", "b200"):
        if tag in name:
            return tag
    return name.replace(" ", "_")


def installed_versions(packages) -> dict[str, str]:
    """package -> installed version, for those of ``packages`` that are installed."""
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def environment() -> dict:
    versions = installed_versions(PACKAGES)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "python": platform.python_version(),
        "versions": versions,
        "cpu": cpu_name(),
        "cpu_cores_available": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return info


def write_result(name: str, payload: dict, path: str | Path | None = None) -> Path:
    """Write ``{environment, **payload}`` to bench/results/<name>_<device>.json (or ``path``)."""
    target = Path(path) if path else RESULTS / f"{name}_{device_tag()}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        json.dumps({"benchmark": name, "environment": environment(), **payload}, indent=1) + "\n"
    )
    return target


def write_ten_class_shards(images, out: Path, max_count: int) -> None:
    """uint8 HWC ``images`` as JPEG shards out/train-%06d.tar, labelled ``i % 10`` (classes "0".."9"): the
    CIFAR-like training data of `bench.py pipeline` and gpu-check, generated without a download."""
    import numpy as np

    from ..pipeline.shards.pixel_sources import array_samples
    from ..pipeline.shards.writer import write_shards

    count = len(images)
    write_shards(
        array_samples(images, np.arange(count) % 10),
        str(out / "train-%06d.tar"),
        [str(i) for i in range(10)],
        count,
        max_count=max_count,
    )

"""Where images come from: sources that yield ``Sample`` s for ``pipeline.shardset.write_shards``.

- ``folder_samples``: ``ROOT/CLASS/*.ext`` (labels follow the sorted class-folder names);
- ``cifar_samples``: the official CIFAR-10/100 python tarball;
- ``array_samples``: uint8 arrays + labels (``.npz`` files, tests);
- ``synthetic_images``: the demo's generated shape images.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import tarfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .shardset import Sample, ShardError, check_image

# Files a source folder may hold as images (anything else is reported, not read).
IMAGE_FILE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _load_and_check(path: str) -> tuple[bytes, bool, str]:
    data = Path(path).read_bytes()
    ok, reason = check_image(data)
    return data, ok, reason


def folder_samples(root: Path, seed: int = 0, workers: int | None = None) -> tuple[list[str], int, Iterator[Sample], list[tuple[str, str]]]:
    """Samples from ``root/CLASS/*.ext``; labels follow the sorted class-folder names.

    Returns (classes, count, samples, problems found before reading: empty class folders, non-image files).
    The order is shuffled with ``seed`` so each shard mixes classes (DALI shuffles within a buffer only).
    """
    if not root.is_dir():
        raise ShardError(f"image folder {root} does not exist or is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ShardError(f"image folder {root} has no class subfolders (expected ROOT/CLASS/image.jpg)")
    problems: list[tuple[str, str]] = []
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        members = sorted(p for p in (root / name).rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in members if p.suffix.lower() in IMAGE_FILE_SUFFIXES]
        problems += [(str(p), "not an image file (unknown extension)") for p in members if p.suffix.lower() not in IMAGE_FILE_SUFFIXES]
        if not images:
            problems.append((str(root / name), "class folder holds no images"))
        files += [(str(p), label) for p in images]
    order = np.random.default_rng(seed).permutation(len(files))
    files = [files[i] for i in order]

    def generate() -> Iterator[Sample]:
        # spawn, not fork: a fork of a process with live threads (torch, DALI, tqdm) can deadlock in the child
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
            results = pool.map(_load_and_check, [f for f, _ in files], chunksize=64)
            for index, ((path, label), (data, ok, reason)) in enumerate(zip(files, results)):
                # An empty key marks a bad input; write_shards stops or skips it.
                yield Sample(f"{index:08d}", data, label, path) if ok else Sample("", b"", label, f"{path}\t{reason}")

    return classes, len(files), generate(), problems


def cifar_samples(tarball: Path, split: str, quality: int = 95) -> tuple[list[str], int, Iterator[Sample]]:
    """Samples from the official CIFAR-10 or CIFAR-100 *python* tarball (cifar-10-python.tar.gz)."""
    if not tarball.is_file():
        raise ShardError(f"CIFAR tarball {tarball} does not exist")
    with tarfile.open(tarball, "r:*") as archive:
        names = archive.getnames()
        blob = {n.rsplit("/", 1)[-1]: n for n in names}
        if "batches.meta" in blob:  # CIFAR-10
            meta = pickle.load(archive.extractfile(blob["batches.meta"]), encoding="latin1")
            classes = meta["label_names"]
            parts = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
            label_key = "labels"
        elif "meta" in blob:  # CIFAR-100
            meta = pickle.load(archive.extractfile(blob["meta"]), encoding="latin1")
            classes = meta["fine_label_names"]
            parts = ["train" if split == "train" else "test"]
            label_key = "fine_labels"
        else:
            raise ShardError(f"{tarball} is not a CIFAR python tarball (no batches.meta or meta member)")
        images, labels = [], []
        for part in parts:
            if part not in blob:
                raise ShardError(f"{tarball} lacks member {part}")
            batch = pickle.load(archive.extractfile(blob[part]), encoding="latin1")
            images.append(batch["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += list(batch[label_key])
    images_array = np.concatenate(images)

    def generate() -> Iterator[Sample]:
        for index, (image, label) in enumerate(zip(images_array, labels)):
            yield Sample(f"{index:08d}", encode_jpeg(image, quality), int(label), f"{tarball}:{split}[{index}]")

    return list(classes), len(labels), generate()


def array_samples(images: np.ndarray, labels: np.ndarray, quality: int = 95, source: str = "arrays") -> Iterator[Sample]:
    """Samples from uint8 arrays: images (N, H, W, 3) or (N, H, W), labels (N,) non-negative ints."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise ShardError(f"{source}: images must be uint8 (N, H, W[, 3]); got {images.dtype} {images.shape}")
    if len(labels) != len(images) or (np.asarray(labels) < 0).any():
        raise ShardError(f"{source}: need one non-negative label per image; got {len(labels)} labels for {len(images)} images")
    for index, (image, label) in enumerate(zip(images, labels)):
        yield Sample(f"{index:08d}", encode_jpeg(image.squeeze(), quality), int(label), f"{source}[{index}]")


SHAPES = ("disc", "square", "triangle", "ring", "plus", "diamond", "cross", "half-disc", "bar", "two-dots")


def synthetic_images(num_classes: int = 10, per_class: int = 200, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A procedurally generated labeled image set for the demo (no download): class c is the shape
    ``SHAPES[c]`` at a random position, size and small rotation, in a random colour over a background
    of another random colour, both with a little noise. Colour is independent of the class, so only
    shape identifies it -- what SimCLR's augmentations leave intact."""
    if not 1 <= num_classes <= len(SHAPES):
        raise ShardError(f"synthetic data has {len(SHAPES)} shape classes; asked for {num_classes}")
    rng = np.random.default_rng(seed)
    grid = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    images = np.empty((len(labels), size, size, 3), np.uint8)
    for index, label in enumerate(labels):
        angle = rng.uniform(-0.3, 0.3)
        y, x = grid[0] - rng.uniform(0.38, 0.62), grid[1] - rng.uniform(0.38, 0.62)
        x, y = np.cos(angle) * x - np.sin(angle) * y, np.sin(angle) * x + np.cos(angle) * y
        r = rng.uniform(0.28, 0.4)
        radius = np.hypot(x, y)
        mask = {
            "disc": radius < r,
            "square": np.maximum(abs(x), abs(y)) < 0.8 * r,
            "triangle": (y < 0.7 * r) & (y > -0.9 * r + 2.0 * abs(x)),
            "ring": (radius < r) & (radius > 0.6 * r),
            "plus": (np.minimum(abs(x), abs(y)) < 0.3 * r) & (np.maximum(abs(x), abs(y)) < r),
            "diamond": abs(x) + abs(y) < r,
            "cross": (abs(abs(x) - abs(y)) < 0.3 * r) & (np.maximum(abs(x), abs(y)) < 0.8 * r),
            "half-disc": (radius < r) & (y > 0),
            "bar": (abs(x) < r) & (abs(y) < 0.3 * r),
            "two-dots": (np.hypot(x - 0.55 * r, y) < 0.4 * r) | (np.hypot(x + 0.55 * r, y) < 0.4 * r),
        }[SHAPES[label]]
        foreground = rng.uniform(0.0, 1.0, 3) + rng.normal(0, 0.04, (size, size, 3))
        background = rng.uniform(0.0, 1.0, 3) + rng.normal(0, 0.04, (size, size, 3))
        images[index] = np.clip(np.where(mask[..., None], foreground, background) * 255, 0, 255).astype(np.uint8)
    return images, labels



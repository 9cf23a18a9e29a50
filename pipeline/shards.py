"""WebDataset shard tools: write, index and verify.

A shard is a POSIX tar of samples ``{key}.jpg`` + ``{key}.cls`` (the label as ASCII digits, the
WebDataset convention), written with ``webdataset.ShardWriter`` so that any WebDataset reader can read it.
Beside each ``NAME.tar`` lies ``NAME.idx``, DALI's index (format v1.2), so DALI's reader never scans tars
at start-up, and beside the set a ``classes.json`` with the class names in label order.

    python -m pipeline.shards write folder  IMAGE_ROOT OUT/train-{000000..999999}.tar
    python -m pipeline.shards write cifar   cifar-10-python.tar.gz OUT/train-%06d.tar --split train
    python -m pipeline.shards write arrays  data.npz OUT/train-%06d.tar
    python -m pipeline.shards write synthetic OUT/demo-train-%06d.tar --num-classes 10 --per-class 200
    python -m pipeline.shards index OUT/train-{000000..000012}.tar
    python -m pipeline.shards verify OUT/
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import multiprocessing
import os
import pickle
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
INDEX_VERSION = "v1.2"


class ShardError(ValueError):
    """Bad shard data; the message names the shard (and key) at fault."""


# --------------------------------------------------------------------------- shard names


def shard_paths(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand a shard specification into tar paths, checking that each exists and is a non-empty file.

    ``spec`` may be a directory (every ``*.tar`` in it, sorted), brace notation
    (``data/train-{000000..000012}.tar``), a glob, a comma-separated list, or a list of any of these.
    """
    if isinstance(spec, (str, os.PathLike)):
        specs = [s for s in str(spec).split(",") if s]
    else:
        specs = [str(s) for s in spec]
    paths: list[Path] = []
    for item in specs:
        item_path = Path(item)
        if item_path.is_dir():
            found = sorted(item_path.glob("*.tar"))
            if not found:
                raise ShardError(f"no *.tar shards in directory {item}")
            paths += found
            continue
        for expanded in braceexpand.braceexpand(item):
            if any(ch in expanded for ch in "*?["):
                found = sorted(Path(p) for p in glob.glob(expanded))
                if not found:
                    raise ShardError(f"no shards match {expanded}")
                paths += found
            else:
                paths.append(Path(expanded))
    if not paths:
        raise ShardError(f"no shards given ({spec!r})")
    for path in paths:
        if not path.exists():
            raise ShardError(f"shard {path} does not exist")
        if not path.is_file():
            raise ShardError(f"shard {path} is not a file")
        if path.stat().st_size == 0:
            raise ShardError(f"shard {path} is empty (0 bytes)")
    return paths


def brace_notation(paths: list[Path]) -> str:
    """``[d/a-000000.tar, d/a-000001.tar]`` -> ``d/a-{000000..000001}.tar`` (for consecutive numbered names)."""
    if len(paths) == 1:
        return str(paths[0])
    match = [re.fullmatch(r"(.*?)(\d+)(\.tar)", str(p)) for p in paths]
    if all(match) and len({(m.group(1), m.group(3), len(m.group(2))) for m in match}) == 1:
        numbers = [int(m.group(2)) for m in match]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            first, last = match[0].group(2), match[-1].group(2)
            return f"{match[0].group(1)}{{{first}..{last}}}{match[0].group(3)}"
    return ",".join(str(p) for p in paths)


def _printf_pattern(out: str) -> str:
    """Accept ``train-%06d.tar`` or brace notation ``train-{000000..999999}.tar`` for output names."""
    if "%" in out:
        return out
    match = re.search(r"\{(\d+)\.\.(\d+)\}", out)
    if match:
        return out[: match.start()] + f"%0{len(match.group(1))}d" + out[match.end() :]
    raise ShardError(f"output pattern {out!r} needs a shard number: use e.g. train-%06d.tar or train-{{000000..999999}}.tar")


# --------------------------------------------------------------------------- index


def index_path(tar: Path) -> Path:
    return tar.with_suffix(".idx")


def build_index(tar: Path) -> list[list[tuple[str, int, int, str]]]:
    """Read a tar's member headers -> samples, each a list of (ext, data offset, size, member name).

    Raises ``ShardError`` naming the shard if the tar is empty, truncated or not a tar.
    """
    samples: list[list[tuple[str, int, int, str]]] = []
    last_key = None
    archive_end = 0
    try:
        with tarfile.open(tar, "r:") as archive:
            for member in archive:
                archive_end = member.offset_data + -(-member.size // 512) * 512
                if not member.isfile():
                    continue
                name = member.name
                base = name.rsplit("/", 1)[-1]
                if base.startswith("."):
                    continue
                if " " in name:
                    raise ShardError(f"shard {tar}: member {name!r} has a space in its name (DALI's index cannot hold it)")
                key, ext = sample_key(name), base.partition(".")[2]
                if not ext:
                    raise ShardError(f"shard {tar}: member {name!r} has no extension")
                if key != last_key:
                    samples.append([])
                    last_key = key
                samples[-1].append((ext, member.offset_data, member.size, name))
    except tarfile.ReadError as error:
        raise ShardError(f"shard {tar} is not a readable tar ({error}); it may be truncated or corrupt") from None
    if not samples:
        raise ShardError(f"shard {tar} holds no samples")
    # tarfile stops quietly at a truncated header or member, so check the end ourselves: the data of
    # the last member must fit, followed by the two zero blocks that end every complete tar.
    with open(tar, "rb") as handle:
        handle.seek(archive_end)
        marker = handle.read(1024)
    if len(marker) < 1024 or marker.count(0) != 1024:
        raise ShardError(f"shard {tar} is truncated or damaged: no end-of-archive marker after its last member (byte {archive_end})")
    return samples


def write_index(tar: Path) -> Path:
    """Write DALI's index (v1.2: ``ext offset size name`` per component) beside ``tar``; atomic."""
    index = ShardIndex(tar, [{ext: (offset, size, name) for ext, offset, size, name in sample} for sample in build_index(tar)])
    target = index_path(tar)
    tmp = target.with_suffix(".idx.tmp")
    tmp.write_text(index.text())
    os.replace(tmp, target)
    return target


@dataclass
class ShardIndex:
    """What a shard's DALI index says: number of samples and their components."""

    tar: Path
    samples: list[dict[str, tuple[int, int, str]]]  # ext -> (offset, size, member name)

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def text(self) -> str:
        """The index file's contents (DALI v1.2)."""
        lines = [f"{INDEX_VERSION} {self.num_samples}"]
        lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, (offset, size, name) in sample.items()) for sample in self.samples]
        return "\n".join(lines) + "\n"


def read_index(tar: Path) -> ShardIndex:
    """Parse and sanity-check ``tar``'s index (exists, well formed, consistent with the tar's size)."""
    idx = index_path(tar)
    if not idx.exists():
        raise ShardError(f"shard {tar} has no index {idx}; create it with: python -m pipeline.shards index {tar}")
    lines = idx.read_text().splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ShardError(f"index {idx} has a bad header {lines[:1]}; rebuild it with: python -m pipeline.shards index {tar}")
    count = int(header[1])
    if count == 0 or len(lines) - 1 != count:
        raise ShardError(f"index {idx} says {count} samples but lists {len(lines) - 1}; rebuild it")
    samples = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) % 4:
            raise ShardError(f"index {idx} has a malformed line {line!r}; rebuild it")
        samples.append({fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields), 4)})
    size = tar.stat().st_size
    end = max(offset + length for sample in samples for offset, length, _ in sample.values())
    if end > size:
        raise ShardError(f"shard {tar} is truncated: its index reaches byte {end} but the file has {size} bytes")
    return ShardIndex(tar, samples)


def sample_key(member_name: str) -> str:
    """``000123.jpg`` -> ``000123`` (WebDataset: the key is the name up to the first dot of the base name)."""
    directory, _, base = member_name.rpartition("/")
    return (directory + "/" if directory else "") + base.split(".", 1)[0]


def read_classes(shards: list[Path]) -> list[str] | None:
    """Class names from ``classes.json`` beside the first shard, if present."""
    path = shards[0].parent / "classes.json"
    return json.loads(path.read_text())["classes"] if path.exists() else None


# --------------------------------------------------------------------------- sources


@dataclass
class Sample:
    key: str
    image: bytes  # encoded image (JPEG unless the source gave another decodable format)
    label: int
    source: str  # where it came from, for error messages


@dataclass
class WriteReport:
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    shards: list[Path] = field(default_factory=list)


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def check_image(data: bytes) -> tuple[bool, str]:
    """Decode fully (at 1/8 scale through JPEG DCT scaling, which still reads every byte) -> (ok, reason)."""
    if not data:
        return False, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return True, ""
    except UnidentifiedImageError:
        return False, "not a decodable image (unknown format, or truncated before the image header ends)"
    except Exception as error:  # PIL raises OSError/SyntaxError/ValueError... for bad data
        text = str(error)
        if "truncated" in text.lower():
            return False, f"truncated image data ({text})"
        return False, f"corrupt image ({type(error).__name__}: {text})"


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
        images = [p for p in members if p.suffix.lower() in IMAGE_EXTENSIONS]
        problems += [(str(p), "not an image file (unknown extension)") for p in members if p.suffix.lower() not in IMAGE_EXTENSIONS]
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


# --------------------------------------------------------------------------- write


def write_shards(
    samples: Iterable[Sample],
    out: str,
    classes: list[str],
    total: int | None = None,
    max_count: int = 10_000,
    max_bytes: float = 1e9,
    on_error: str = "stop",
    index: bool = True,
    progress: bool = True,
    skipped: list[tuple[str, str]] | None = None,
) -> WriteReport:
    """Write ``samples`` into shards named by ``out`` (printf ``%06d`` or brace pattern), then index them.

    A sample whose ``key`` is empty carries a problem in ``source`` ("path<TAB>reason"): with
    ``on_error='stop'`` it raises, with ``'skip'`` it is counted in the report and left out.
    """
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    report = WriteReport(skipped=list(skipped or []))
    if report.skipped and on_error == "stop":
        source, reason = report.skipped[0]
        raise ShardError(f"{source}: {reason} (pass --on-error skip to leave such inputs out)")
    pattern = _printf_pattern(out)
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def finished(name: str) -> None:  # ShardWriter calls this after closing each shard
        os.replace(name + ".tmp", name)
        written.append(Path(name))

    # A fixed mtime makes shards byte-for-byte reproducible from the same inputs and seed.
    writer = wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_bytes, verbose=0, opener=lambda name: open(name + ".tmp", "wb"),
                             post=finished, mtime=0.0)
    try:
        for sample in tqdm(samples, total=total, desc=f"writing {Path(pattern).name}", unit="img", disable=not progress):
            if not sample.key:
                path, _, reason = sample.source.partition("\t")
                if on_error == "stop":
                    raise ShardError(f"{path}: {reason} (pass --on-error skip to leave such inputs out)")
                report.skipped.append((path, reason))
                continue
            if sample.label < 0:
                raise ShardError(f"{sample.source}: negative label {sample.label}")
            writer.write({"__key__": sample.key, "jpg": sample.image, "cls": str(sample.label).encode()})
            report.written += 1
    finally:
        writer.close()
    if report.written == 0:
        raise ShardError(f"no samples were written to {out}")
    report.shards = sorted(written)
    (report.shards[0].parent / "classes.json").write_text(json.dumps({"classes": classes}, indent=1) + "\n")
    if index:
        index_shards(report.shards, progress=progress)
    return report


def index_shards(shards: list[Path], progress: bool = True) -> None:
    for tar in tqdm(shards, desc="indexing", unit="shard", disable=not progress or len(shards) < 2):
        write_index(tar)


# --------------------------------------------------------------------------- verify


def verify_shard(tar: Path, require_labels: bool = True) -> tuple[int, list[str]]:
    """Check a shard: its index matches the tar, every sample has a decodable image and a label.
    Returns (samples, problems) where each problem names the shard and key."""
    problems = []
    try:
        actual = build_index(tar)
    except ShardError as error:
        return 0, [str(error)]
    try:
        indexed = read_index(tar)
        if [[c[1:3] for c in s] for s in actual] != [sorted(((o, n) for o, n, _ in s.values())) for s in indexed.samples]:
            problems.append(f"shard {tar}: index {index_path(tar)} does not match the tar; rebuild it with `index`")
    except ShardError as error:
        problems.append(str(error))
    with open(tar, "rb") as handle:
        for sample in actual:
            key = sample_key(sample[0][3])
            parts = {ext: (offset, size) for ext, offset, size, _ in sample}
            image_ext = next((e for e in parts if e.lower() in ("jpg", "jpeg", "png", "webp")), None)
            if image_ext is None:
                problems.append(f"shard {tar} key {key}: no image component (has {sorted(parts)})")
            else:
                handle.seek(parts[image_ext][0])
                ok, reason = check_image(handle.read(parts[image_ext][1]))
                if not ok:
                    problems.append(f"shard {tar} key {key}: image does not decode ({reason})")
            if require_labels:
                if "cls" not in parts:
                    problems.append(f"shard {tar} key {key}: no label (.cls) component")
                else:
                    handle.seek(parts["cls"][0])
                    text = handle.read(parts["cls"][1]).decode("ascii", "replace").strip()
                    if not text.isdigit():
                        problems.append(f"shard {tar} key {key}: label {text!r} is not a non-negative integer")
    return len(actual), problems


def verify_shards(shards: list[Path], require_labels: bool = True, progress: bool = True, workers: int | None = None) -> tuple[int, list[str]]:
    total, problems = 0, []
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        results = pool.map(verify_shard, shards, [require_labels] * len(shards))
        for count, found in tqdm(results, total=len(shards), desc="verifying", unit="shard", disable=not progress):
            total += count
            problems += found
    return total, problems


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    write = commands.add_parser("write", help="write WebDataset shards (+ DALI indexes, classes.json) from images")
    sources = write.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--max-count", "--max_count", type=int, default=10_000, help="samples per shard (default 10000)")
    common.add_argument("--max-bytes", "--max_bytes", type=float, default=1e9, help="bytes per shard (default 1e9)")
    common.add_argument("--quality", type=int, default=95, help="JPEG quality when encoding raw pixels (default 95)")
    common.add_argument("--no-index", action="store_true", help="do not write DALI index files")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    out_help = "output shard names: printf (OUT/train-%%06d.tar) or brace (OUT/train-{000000..999999}.tar) pattern"
    folder = sources.add_parser("folder", parents=[common], help="from ROOT/CLASS/*.jpg (labels: sorted class-folder names)")
    folder.add_argument("root", type=Path)
    folder.add_argument("out", help=out_help)
    folder.add_argument("--on-error", "--on_error", choices=["stop", "skip"], default="stop",
                        help="bad inputs (truncated/non-image files, empty class folders): stop with an error (default) or skip and count")
    folder.add_argument("--seed", type=int, default=0, help="seed of the sample order shuffle (default 0)")
    folder.add_argument("--workers", type=int, default=None, help="processes reading and checking images (default: all cores)")
    cifar = sources.add_parser("cifar", parents=[common], help="from the official CIFAR-10/100 python tarball")
    cifar.add_argument("tarball", type=Path)
    cifar.add_argument("out", help=out_help)
    cifar.add_argument("--split", choices=["train", "test"], required=True)
    arrays = sources.add_parser("arrays", parents=[common], help="from a .npz with uint8 `images` (N,H,W[,3]) and int `labels` (N,)")
    arrays.add_argument("npz", type=Path)
    arrays.add_argument("out", help=out_help)
    arrays.add_argument("--classes", default=None, help="comma-separated class names (default: 0..K-1)")
    synthetic = sources.add_parser("synthetic", parents=[common], help="procedurally generated shapes/textures (the demo's data)")
    synthetic.add_argument("out", help=out_help)
    synthetic.add_argument("--num-classes", "--num_classes", type=int, default=10)
    synthetic.add_argument("--per-class", "--per_class", type=int, default=200)
    synthetic.add_argument("--size", type=int, default=32)
    synthetic.add_argument("--seed", type=int, default=0)

    index = commands.add_parser("index", help="write DALI index files (NAME.idx beside each NAME.tar)")
    index.add_argument("shards", nargs="+", help="shard files, directories, globs or brace patterns")
    index.add_argument("--quiet", action="store_true")

    verify = commands.add_parser("verify", help="check that every sample decodes and has a label; lists bad shard/key pairs")
    verify.add_argument("shards", nargs="+", help="shard files, directories, globs or brace patterns")
    verify.add_argument("--no-labels", action="store_true", help="do not require .cls labels")
    verify.add_argument("--workers", type=int, default=None)
    verify.add_argument("--quiet", action="store_true")

    args = parser.parse_args(argv)
    try:
        if args.command == "write":
            options = dict(max_count=args.max_count, max_bytes=args.max_bytes, index=not args.no_index, progress=not args.quiet)
            if args.source == "folder":
                classes, total, samples, problems = folder_samples(args.root, seed=args.seed, workers=args.workers)
                report = write_shards(samples, args.out, classes, total, on_error=args.on_error, skipped=problems, **options)
            elif args.source == "cifar":
                classes, total, samples = cifar_samples(args.tarball, args.split, args.quality)
                report = write_shards(samples, args.out, classes, total, **options)
            elif args.source == "arrays":
                if not args.npz.is_file():
                    raise ShardError(f"array file {args.npz} does not exist")
                data = np.load(args.npz)
                if "images" not in data or "labels" not in data:
                    raise ShardError(f"{args.npz} must hold arrays named 'images' and 'labels' (has {list(data.keys())})")
                labels = data["labels"].astype(np.int64)
                classes = args.classes.split(",") if args.classes else [str(i) for i in range(int(labels.max()) + 1)]
                report = write_shards(array_samples(data["images"], labels, args.quality, str(args.npz)), args.out, classes, len(labels), **options)
            else:
                images, labels = synthetic_images(args.num_classes, args.per_class, args.size, args.seed)
                classes = list(SHAPES[: args.num_classes])
                report = write_shards(array_samples(images, labels, args.quality, "synthetic"), args.out, classes, len(labels), **options)
            print(f"wrote {report.written} samples to {len(report.shards)} shard(s): {brace_notation(report.shards)}")
            if report.skipped:
                print(f"skipped {len(report.skipped)} bad input(s):")
                for source, reason in report.skipped:
                    print(f"  {source}: {reason}")
        elif args.command == "index":
            shards = shard_paths(args.shards)
            index_shards(shards, progress=not args.quiet)
            print(f"indexed {len(shards)} shard(s): {brace_notation(shards)}")
        else:
            shards = shard_paths(args.shards)
            total, problems = verify_shards(shards, require_labels=not args.no_labels, progress=not args.quiet, workers=args.workers)
            for problem in problems:
                print(problem)
            print(f"verified {total} samples in {len(shards)} shard(s): {len(problems)} problem(s)")
            return 1 if problems else 0
    except ShardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

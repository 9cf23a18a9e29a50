"""Sources of raw pixels, encoded by the writer per ``ImagePolicy.pixel_format``: the official CIFAR-10/100
python tarball (read with a restricted unpickler), a ``.npz`` of uint8 arrays, and the demo's generated shape
images; plus in-memory helpers for tests and benchmarks (``encode_jpeg``, ``array_samples`` for
``pipeline.shards.writer.write_shards``).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from .shardset import ShardError
from .sources import Source
from .writer import Sample


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR batches hold: numpy arrays (their reconstructors and dtypes), and the
    plain lists, dicts, strings and numbers pickle builds without any global. Anything else -- a class,
    a function, ``os.system`` -- is refused, so a crafted tarball cannot run code."""

    ALLOWED = {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    }
    ALLOWED |= {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which CIFAR data never holds")


def check_image_array(images: np.ndarray, where: str) -> None:
    """uint8 images (N, H, W) or (N, H, W, 1|3), or a ``ShardError`` naming ``where``."""
    if (
        images.dtype != np.uint8
        or images.ndim not in (3, 4)
        or (images.ndim == 4 and images.shape[-1] not in (1, 3))
    ):
        raise ShardError(
            f"{where}: images must be uint8 (N, H, W[, 3]); got {images.dtype} {images.shape}"
        )


def _load_cifar_member(archive: tarfile.TarFile, member: str, tarball: Path) -> dict:
    try:
        data = _CifarUnpickler(archive.extractfile(member), encoding="latin1").load()
    except Exception as error:  # any unpickling failure is bad input here
        raise ShardError(f"{tarball}: member {member} is not CIFAR data ({error})") from None
    if not isinstance(data, dict):
        raise ShardError(
            f"{tarball}: member {member} is not CIFAR data (a {type(data).__name__}, not a dict)"
        )
    return data


def cifar_source(tarball: Path, split: str) -> Source:
    """The official CIFAR-10 or CIFAR-100 *python* tarball (cifar-10-python.tar.gz); source paths
    ``BATCH/INDEX`` (``data_batch_3/01234``)."""
    tarball = Path(tarball)
    if not tarball.is_file():
        raise ShardError(f"CIFAR tarball {tarball} does not exist")
    try:
        archive = tarfile.open(tarball, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        raise ShardError(
            f"{tarball} is not a tar archive (plain or compressed); expected the CIFAR python tarball "
            "cifar-10-python.tar.gz"
        ) from None
    try:
        with archive:
            blob = {name.rsplit("/", 1)[-1]: name for name in archive.getnames()}
            if "batches.meta" in blob:  # CIFAR-10
                classes = _load_cifar_member(archive, blob["batches.meta"], tarball).get(
                    "label_names"
                )
                parts = (
                    [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
                )
                label_key = "labels"
            elif "meta" in blob:  # CIFAR-100
                classes = _load_cifar_member(archive, blob["meta"], tarball).get("fine_label_names")
                parts = ["train" if split == "train" else "test"]
                label_key = "fine_labels"
            else:
                raise ShardError(
                    f"{tarball} is not a CIFAR python tarball (no batches.meta or meta member)"
                )
            if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
                raise ShardError(f"{tarball}: its meta member holds no list of class names")
            images, labels, paths = [], [], []
            for part in parts:
                if part not in blob:
                    raise ShardError(f"{tarball} lacks member {part}")
                batch = _load_cifar_member(archive, blob[part], tarball)
                data, batch_labels = batch.get("data"), batch.get(label_key)
                if (
                    not isinstance(data, np.ndarray)
                    or data.dtype != np.uint8
                    or data.ndim != 2
                    or data.shape[1] != 3072
                ):
                    raise ShardError(
                        f"{tarball}: member {part} holds no uint8 (N, 3072) 'data' array"
                    )
                if (
                    not isinstance(batch_labels, list)
                    or len(batch_labels) != len(data)
                    or not all(
                        isinstance(v, (int, np.integer)) and 0 <= v < len(classes)
                        for v in batch_labels
                    )
                ):
                    raise ShardError(
                        f"{tarball}: member {part} holds no list of {len(data)} labels in [0, {len(classes)})"
                    )
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels += [int(v) for v in batch_labels]
                paths += [f"{part}/{i:05d}" for i in range(len(data))]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise ShardError(f"{tarball} is damaged ({error})") from None
    pixels = np.ascontiguousarray(np.concatenate(images))
    return Source(
        "cifar",
        str(tarball.resolve()),
        paths,
        labels,
        classes,
        lambda i: pixels[i],
        pixels=True,
        content_digest=hashlib.sha256(pixels.data).hexdigest(),
    )


def _pixels_source(
    kind: str,
    location: str,
    images: np.ndarray,
    labels: np.ndarray | None,
    classes: list[str] | None,
) -> Source:
    """uint8 images (N, H, W[, 1|3]) with labels (N,) (or None), source paths ``00000012``."""
    check_image_array(images, location)
    if len(images) == 0:
        raise ShardError(f"{location}: holds no images (an empty 'images' array)")
    if labels is not None:
        labels = np.asarray(labels)
        if (
            labels.ndim != 1
            or len(labels) != len(images)
            or not np.issubdtype(labels.dtype, np.integer)
            or (labels < 0).any()
        ):
            raise ShardError(
                f"{location}: need one non-negative integer label per image; got {labels.dtype} {labels.shape} "
                f"for {len(images)} images"
            )
        if classes is not None and labels.max() >= len(classes):
            raise ShardError(
                f"{location}: label {int(labels.max())} but only {len(classes)} class names"
            )
        classes = classes or [str(i) for i in range(int(labels.max()) + 1)]
    images = np.ascontiguousarray(images)
    return Source(
        kind,
        location,
        [f"{i:08d}" for i in range(len(images))],
        labels.tolist() if labels is not None else None,
        classes if labels is not None else None,
        lambda i: images[i],
        pixels=True,
        content_digest=hashlib.sha256(images.data).hexdigest(),
    )


def arrays_source(npz: Path, classes: list[str] | None = None) -> Source:
    """A ``.npz`` with uint8 ``images`` (N, H, W[, 3]) and, optionally, integer ``labels`` (N,)."""
    npz = Path(npz)
    if not npz.is_file():
        raise ShardError(f"array file {npz} does not exist")
    try:
        data = np.load(
            npz, allow_pickle=False
        )  # no pickle: an .npz with object arrays cannot run code
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise ShardError(f"{npz} is not a readable .npz file ({error})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ShardError(
            f"{npz} is a single .npy array: expected an .npz holding 'images' (and 'labels'), "
            "e.g. np.savez(path, images=..., labels=...)"
        )
    with data:
        if not data.files:
            raise ShardError(f"{npz} holds no arrays: expected 'images' (and 'labels')")
        if "images" not in data.files:
            raise ShardError(
                f"{npz} must hold an array named 'images' (and optionally 'labels'); it has {data.files}"
            )
        try:
            images = data["images"]
            labels = data["labels"] if "labels" in data.files else None
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
            raise ShardError(f"{npz}: an array cannot be read ({error})") from None
    return _pixels_source("arrays", str(npz.resolve()), images, labels, classes)


def synthetic_source(
    num_classes: int = 10, per_class: int = 200, size: int = 32, seed: int = 0
) -> Source:
    images, labels = synthetic_images(num_classes, per_class, size, seed)
    source = _pixels_source(
        "synthetic",
        f"shapes classes={num_classes} per_class={per_class} size={size} seed={seed}",
        images,
        labels,
        list(SHAPES[:num_classes]),
    )
    return source


# --------------------------------------------------------------------------- in-memory helpers (tests, benchmarks)


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    """uint8 pixels -> JPEG bytes (PIL's defaults: 4:2:0)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def array_samples(
    images: np.ndarray, labels: np.ndarray, quality: int = 95, source: str = "arrays"
) -> Iterator[Sample]:
    """Encoded samples from uint8 arrays for ``pipeline.shards.writer.write_shards``: images (N, H, W, 3) or (N, H, W),
    labels (N,) non-negative ints; keys ``00000012``."""
    check_image_array(images, source)
    if len(labels) != len(images) or (np.asarray(labels) < 0).any():
        raise ShardError(
            f"{source}: need one non-negative label per image; got {len(labels)} labels for {len(images)} images"
        )
    for index, (image, label) in enumerate(zip(images, labels)):
        yield Sample(
            f"{index:08d}", encode_jpeg(image.squeeze(), quality), int(label), f"{source}[{index}]"
        )


SHAPES = (
    "disc",
    "square",
    "triangle",
    "ring",
    "plus",
    "diamond",
    "cross",
    "half-disc",
    "bar",
    "two-dots",
)


def synthetic_images(
    num_classes: int = 10, per_class: int = 200, size: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
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
            "two-dots": (np.hypot(x - 0.55 * r, y) < 0.4 * r)
            | (np.hypot(x + 0.55 * r, y) < 0.4 * r),
        }[SHAPES[label]]
        foreground = rng.uniform(0.0, 1.0, 3) + rng.normal(0, 0.04, (size, size, 3))
        background = rng.uniform(0.0, 1.0, 3) + rng.normal(0, 0.04, (size, size, 3))
        images[index] = np.clip(
            np.where(mask[..., None], foreground, background) * 255, 0, 255
        ).astype(np.uint8)
    return images, labels

"""Where images come from, and the streaming writer that turns a source into a shard set.

Sources (each a ``Source``: inputs in write order, their source paths and labels, how to read each):
- ``images_source``: every image under a folder, recursively, without labels (pretraining data);
- ``folder_source``: ``ROOT/CLASS/...`` (labels follow the sorted class-folder names);
- ``list_source``: a CSV/TSV of ``path[,label]`` rows (ImageNet's validation set, any custom split);
- ``cifar_source``: the official CIFAR-10/100 python tarball (read with a restricted unpickler);
- ``arrays_source``: a ``.npz`` with uint8 ``images`` (and optional ``labels``);
- ``synthetic_source``: the demo's generated shape images.

``write_source`` streams a source into shards: worker processes read, check and (re-)encode images
(``pipeline.images``) with at most ``window`` inputs in flight, the main process writes them in input order
(so the shards do not depend on the number of workers), and every finished shard is recorded in
``shardset.json``, so an interrupted write resumes where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import pickle
import re
import tarfile
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.files import check_writable

from .images import ImagePolicy, prepare_chunk
from .shardset import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_COUNT,
    SET_FILE,
    SET_FORMAT,
    Sample,
    ShardError,
    ShardWriter,
    WriteReport,
    normalized_path,
    output_pattern,
    path_key,
    read_set_record,
    remove_shard,
    sample_members,
    summarize_shards,
    write_classes,
    write_set_record,
)

# Files a source folder may hold as images (anything else is reported, not read); compared lower-case.
IMAGE_FILE_SUFFIXES = {
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".tga",
}


@dataclass
class Source:
    """Inputs in write order. ``paths[i]``: the source path stored in sample i (its key is ``path_key`` of it);
    ``labels``: None for an unlabelled source; ``payload(i)``: a file name or raw pixels for the writer's
    workers; ``problems``: (input, reason) found before reading (non-image files, empty class folders...)."""

    kind: str
    location: str
    paths: list[str]
    labels: list[int] | None
    classes: list[str] | None
    payload: Callable[[int], str | np.ndarray]
    problems: list[tuple[str, str]] = field(default_factory=list)
    pixels: bool = False  # raw pixels (CIFAR, arrays): encoded per ImagePolicy.pixel_format
    seed: int | None = None  # of the order shuffle (None: the source's own order)
    content_digest: str = ""  # for in-memory sources: a digest of the pixels (resumes check it)

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """A digest of what would be written: kind, source paths, labels, classes, problems, pixels."""
        digest = hashlib.sha256(f"{self.kind}\n{self.classes}\n{self.content_digest}\n".encode())
        for position, path in enumerate(self.paths):
            digest.update(
                f"{path}\t{self.labels[position] if self.labels is not None else ''}\n".encode(
                    "utf-8", "surrogateescape"
                )
            )
        for problem in self.problems:
            digest.update(f"!{problem}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()


def _shuffled(items: list, seed: int) -> list:
    """A seeded permutation: shards mix classes and folders (DALI shuffles within a buffer only)."""
    return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]


def _walk_images(root: Path, top: Path, progress: bool = True) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under ``top`` (sorted, hidden files and folders left out) as paths relative to ``root``,
    and other files as problems."""
    images, problems = [], []
    folders_seen = tqdm(
        desc=f"scanning {top}", unit=" folders", disable=None if progress else True, leave=False
    )  # None: terminals only
    for directory, folders, files in os.walk(top):
        folders_seen.update()
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            full = os.path.join(directory, name)
            if Path(name).suffix.lower() in IMAGE_FILE_SUFFIXES:
                images.append(Path(os.path.relpath(full, root)).as_posix())
            else:
                problems.append((full, "not an image file (unknown extension)"))
    folders_seen.close()
    return images, problems


def _file_payload(root: Path, paths: list[str]) -> Callable[[int], str]:
    return lambda position: str(root / paths[position])


def images_source(root: Path, seed: int = 0, progress: bool = False) -> Source:
    """Every image under ``root`` (recursively), unlabelled; source paths relative to ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"image folder {root} does not exist or is not a directory")
    paths, problems = _walk_images(root, root, progress)
    if not paths:
        raise ShardError(f"image folder {root} holds no image files ({', '.join(sorted(IMAGE_FILE_SUFFIXES))})")
    paths = _shuffled(paths, seed)
    return Source("images", str(root.resolve()), paths, None, None, _file_payload(root, paths), problems, seed=seed)


def folder_source(root: Path, seed: int = 0, progress: bool = False) -> Source:
    """``root/CLASS/...`` (any depth below each class folder); labels follow the sorted class-folder names."""
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"image folder {root} does not exist or is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ShardError(
            f"image folder {root} has no class subfolders (expected ROOT/CLASS/image.jpg; "
            "for images without labels use `write images`)"
        )
    problems = [
        (str(p), "not in a class folder (expected ROOT/CLASS/image.jpg)")
        for p in sorted(root.iterdir())
        if p.is_file() and not p.name.startswith(".")
    ]
    items: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        images, found = _walk_images(root, root / name, progress)
        problems += found
        if not images:
            problems.append((str(root / name), "class folder holds no images"))
        items += [(path, label) for path in images]
    items = _shuffled(items, seed)
    paths = [path for path, _ in items]
    return Source(
        "folder",
        str(root.resolve()),
        paths,
        [label for _, label in items],
        classes,
        _file_payload(root, paths),
        problems,
        seed=seed,
    )


def read_class_names(path: Path) -> list[str]:
    """Class names in label order from a ``classes.json`` (``{"classes": [...]}``) or a text file (one per line)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ShardError(f"class-name file {path} cannot be read ({error.strerror or error})") from None
    if path.suffix == ".json":
        try:
            names = json.loads(text)["classes"]
        except (ValueError, KeyError, TypeError):
            raise ShardError(
                f'class-name file {path} is not a classes.json ({{"classes": [names in label order]}})'
            ) from None
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names or len(set(names)) != len(names):
        raise ShardError(f"class-name file {path} lists no names or a name twice")
    return [str(n) for n in names]


def list_source(list_file: Path, root: Path | None = None, classes_file: Path | None = None, seed: int = 0) -> Source:
    """Rows ``path[,label]`` of a CSV (``.csv``) or TSV (``.tsv``; other names: tab if the first row has one);
    blank lines and ``#`` comments skipped, an optional header ``path[,label]``. Paths are relative to ``root``
    (default: the list's folder). Labels are integers, or class names (indexed by ``classes_file`` when given,
    else sorted). Every row has a label or none does (an unlabelled set)."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise ShardError(f"list file {list_file} does not exist")
    root = Path(root) if root is not None else list_file.parent
    if not root.is_dir():
        raise ShardError(f"--root {root} does not exist or is not a directory")
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ShardError(f"list file {list_file} cannot be read as UTF-8 text ({error})") from None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip() and not line.startswith("#")), "")
    delimiter = (
        ","
        if list_file.suffix.lower() == ".csv"
        else "\t"
        if list_file.suffix.lower() == ".tsv" or "\t" in first
        else ","
    )
    rows: list[tuple[int, list[str]]] = []
    for number, row in enumerate(csv.reader(lines, delimiter=delimiter), 1):
        if not row or not "".join(row).strip() or row[0].startswith("#"):
            continue
        rows.append((number, [cell.strip() for cell in row]))
    if rows and [c.lower() for c in rows[0][1]] in (["path"], ["path", "label"]):
        rows = rows[1:]
    if not rows:
        raise ShardError(f"list file {list_file} lists no files")
    widths = {len(cells) for _, cells in rows}
    if not widths <= {1, 2} or len(widths) > 1:
        number, cells = next((n, c) for n, c in rows if len(c) != len(rows[0][1]) or len(c) > 2)
        raise ShardError(
            f"list file {list_file} line {number}: expected 'path{delimiter}label' or 'path' on every line, got {cells}"
        )
    labelled = widths == {2}
    seen: dict[str, int] = {}
    items: list[tuple[str, str, int]] = []  # (path, label text, line number)
    for number, cells in rows:
        path = cells[0]
        if os.path.isabs(path):
            relative = os.path.relpath(path, root)
            if relative.startswith(".."):
                raise ShardError(f"list file {list_file} line {number}: {path} is outside --root {root}")
            path = relative
        try:
            path = normalized_path(Path(path).as_posix())
        except ShardError:
            raise ShardError(
                f"list file {list_file} line {number}: path {cells[0]!r} must name a file inside --root {root}"
            ) from None
        if path in seen:
            raise ShardError(f"list file {list_file} lines {seen[path]} and {number} both list {path}")
        seen[path] = number
        items.append((path, cells[1] if labelled else "", number))
    classes = labels = None
    if labelled:
        names = read_class_names(classes_file) if classes_file else None
        if all(label.isdigit() for _, label, _ in items):
            labels = [int(label) for _, label, _ in items]
            classes = names or [str(i) for i in range(max(labels) + 1)]
            beyond = next((number for _, label, number in items if int(label) >= len(classes)), None)
            if beyond is not None:
                raise ShardError(
                    f"list file {list_file} line {beyond}: label beyond the {len(classes)} classes of {classes_file}"
                )
        else:
            classes = names or sorted({label for _, label, _ in items})
            lookup = {name: index for index, name in enumerate(classes)}
            unknown = next(((number, label) for _, label, number in items if label not in lookup), None)
            if unknown:
                raise ShardError(
                    f"list file {list_file} line {unknown[0]}: class {unknown[1]!r} is not in {classes_file}"
                )
            labels = [lookup[label] for _, label, _ in items]
    exists = [(root / path).is_file() for path, _, _ in items]
    problems = [
        (str(root / path), "listed file does not exist") for (path, _, _), found in zip(items, exists) if not found
    ]
    order = _shuffled([i for i, found in enumerate(exists) if found], seed)
    paths = [items[i][0] for i in order]
    return Source(
        "list",
        str(list_file.resolve()),
        paths,
        [labels[i] for i in order] if labels is not None else None,
        classes,
        _file_payload(root, paths),
        problems,
        seed=seed,
    )


# --------------------------------------------------------------------------- raw-pixel sources


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


def _load_cifar_member(archive: tarfile.TarFile, member: str, tarball: Path) -> dict:
    try:
        data = _CifarUnpickler(archive.extractfile(member), encoding="latin1").load()
    except Exception as error:  # any unpickling failure is bad input here
        raise ShardError(f"{tarball}: member {member} is not CIFAR data ({error})") from None
    if not isinstance(data, dict):
        raise ShardError(f"{tarball}: member {member} is not CIFAR data (a {type(data).__name__}, not a dict)")
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
                classes = _load_cifar_member(archive, blob["batches.meta"], tarball).get("label_names")
                parts = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
                label_key = "labels"
            elif "meta" in blob:  # CIFAR-100
                classes = _load_cifar_member(archive, blob["meta"], tarball).get("fine_label_names")
                parts = ["train" if split == "train" else "test"]
                label_key = "fine_labels"
            else:
                raise ShardError(f"{tarball} is not a CIFAR python tarball (no batches.meta or meta member)")
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
                    raise ShardError(f"{tarball}: member {part} holds no uint8 (N, 3072) 'data' array")
                if (
                    not isinstance(batch_labels, list)
                    or len(batch_labels) != len(data)
                    or not all(isinstance(v, (int, np.integer)) and 0 <= v < len(classes) for v in batch_labels)
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
    kind: str, location: str, images: np.ndarray, labels: np.ndarray | None, classes: list[str] | None
) -> Source:
    """uint8 images (N, H, W[, 1|3]) with labels (N,) (or None), source paths ``00000012``."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise ShardError(f"{location}: images must be uint8 (N, H, W[, 3]); got {images.dtype} {images.shape}")
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
            raise ShardError(f"{location}: label {int(labels.max())} but only {len(classes)} class names")
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
        data = np.load(npz, allow_pickle=False)  # no pickle: an .npz with object arrays cannot run code
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
            raise ShardError(f"{npz} must hold an array named 'images' (and optionally 'labels'); it has {data.files}")
        try:
            images = data["images"]
            labels = data["labels"] if "labels" in data.files else None
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
            raise ShardError(f"{npz}: an array cannot be read ({error})") from None
    return _pixels_source("arrays", str(npz.resolve()), images, labels, classes)


def synthetic_source(num_classes: int = 10, per_class: int = 200, size: int = 32, seed: int = 0) -> Source:
    images, labels = synthetic_images(num_classes, per_class, size, seed)
    source = _pixels_source(
        "synthetic",
        f"shapes classes={num_classes} per_class={per_class} size={size} seed={seed}",
        images,
        labels,
        list(SHAPES[:num_classes]),
    )
    return source


# --------------------------------------------------------------------------- the streaming writer


def ordered_map(function: Callable, items: Iterable, workers: int, window: int, *args) -> Iterator:
    """``function(chunk, *args)`` (a list of results per list of items) over ``items`` in ``workers`` spawned
    processes, yielding results one by one in input order. At most ``window`` items are taken from ``items``
    and not yet yielded at any time: memory is bounded whatever the number of inputs or the speed of the
    consumer. ``workers`` 1: in this process."""
    items = iter(items)
    if workers <= 1:
        for item in items:
            yield function([item], *args)[0]
        return
    chunk = max(1, window // (4 * workers))
    # spawn, not fork: a fork of a process with live threads (torch, DALI, tqdm) can deadlock in the child
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    pending: deque = deque()
    in_flight = 0
    try:
        while True:
            while in_flight < window:
                batch = list(itertools.islice(items, min(chunk, window - in_flight)))
                if not batch:
                    break
                pending.append(pool.submit(function, batch, *args))
                in_flight += len(batch)
            if not pending:
                return
            for result in pending.popleft().result():
                in_flight -= 1
                yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_outside(directory: Path, image_folder: Path) -> None:
    """Shards written inside the folder they are read from would be inputs of the next (resumed) run."""
    if Path(directory).resolve().is_relative_to(Path(image_folder).resolve()):
        raise ShardError(
            f"output directory {directory} is inside the image folder {image_folder}: its shards would become "
            "inputs of the next run; write elsewhere"
        )


def writable_directory(directory: Path) -> Path:
    try:
        return check_writable(directory)
    except OSError as error:
        raise ShardError(str(error)) from None


def _shard_name(pattern_name: str) -> re.Pattern:
    """A regex for the file names a printf shard pattern (``train-%06d.tar``) produces."""
    before, _, after = re.split(r"(%0?\d*d)", pattern_name.replace("%%", "\0"), maxsplit=1)
    return re.compile(re.escape(before.replace("\0", "%")) + r"\d+" + re.escape(after.replace("\0", "%")))


def _pattern_files(pattern: str) -> list[Path]:
    """The shard paths (``NAME.tar``) of existing files whose names fit ``pattern``: shards, leftover ``NAME.tar.tmp``
    temporaries and indexes (``NAME.idx``, also one whose shard is gone)."""
    directory, regex = Path(pattern).parent, _shard_name(Path(pattern).name)
    if not directory.is_dir():
        return []
    names = {
        p.name.removesuffix(".tmp") if p.suffix == ".tmp" else p.stem + ".tar" if p.suffix == ".idx" else p.name
        for p in directory.iterdir()
    }
    return sorted(directory / name for name in names if regex.fullmatch(name))


def _remove_stale_temporaries(directory: Path, pattern: str) -> None:
    """Hidden temporaries ``common.files.atomic_path`` leaves when a process is killed mid-write (indexes, record)."""
    shard = _shard_name(Path(pattern).name)
    for path in directory.glob(".*.tmp"):
        target, has_index, _ = path.name[1:].partition(".idx.")
        if path.name[1:].startswith(SET_FILE + ".") or (has_index and shard.fullmatch(target + ".tar")):
            path.unlink(missing_ok=True)


def _clear(directory: Path, patterns: list[str]) -> None:
    for pattern in patterns:
        for path in _pattern_files(str(directory / pattern)):
            remove_shard(path)
    (directory / SET_FILE).unlink(missing_ok=True)


def _differences(record: dict, new: dict) -> list[str]:
    """What differs between a recorded write and a new one, as 'field: old -> new'."""
    details = [
        f"{key}: {record.get(key)!r} -> {new[key]!r}"
        for key in ("pattern", "labelled", "num_classes")
        if record.get(key) != new[key]
    ]
    details += [
        f"{key}: {record.get('settings', {}).get(key)!r} -> {value!r}"
        for key, value in new["settings"].items()
        if record.get("settings", {}).get(key) != value
    ]
    old, now = record.get("source", {}), new["source"]
    if old.get("order_seed") != now["order_seed"]:
        details.append(f"seed: {old.get('order_seed')!r} -> {now['order_seed']!r}")
    elif any(old.get(key) != now[key] for key in ("kind", "inputs", "fingerprint")):
        same_count = " (as many, but other files, labels or pixels)" if old.get("inputs") == now["inputs"] else ""
        details.append(
            f"inputs: {old.get('kind')} {old.get('location')} with {old.get('inputs')} -> "
            f"{now['kind']} {now['location']} with {now['inputs']}{same_count}"
        )
    return details


def _resume_point(directory: Path, pattern: str, record: dict | None, new: dict, overwrite: bool) -> list[dict]:
    """The finished shards to keep: those of an interrupted identical write (listed, present, the recorded
    size). ``ShardError`` when ``directory`` holds another write's shards and ``overwrite`` is not set."""
    name = Path(pattern).name
    if overwrite:
        _clear(directory, [name] + ([record["pattern"]] if record else []))
        return []
    if record is None:
        existing = [p for p in _pattern_files(pattern) if p.is_file()]
        if existing:
            raise ShardError(
                f"{directory} holds {len(existing)} shard(s) named like {name} but no {SET_FILE} (written by another "
                "tool or an older version): pass --overwrite to replace them, or write into another directory"
            )
        return []
    details = _differences(record, new)
    if details:
        raise ShardError(
            f"{directory} holds shards of a different write ({'; '.join(details)}); pass --overwrite to replace them, "
            "or write into another directory"
        )
    kept = []
    for shard in record.get("shards", []):
        path = directory / shard["name"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            break
        kept.append(shard)
    for path in _pattern_files(pattern):  # anything after the kept shards is redone
        if path.name not in {s["name"] for s in kept}:
            remove_shard(path)
    return kept


def write_source(
    source: Source,
    out: str,
    policy: ImagePolicy | None = None,
    *,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: float = DEFAULT_MAX_BYTES,
    on_error: str = "stop",
    workers: int = 1,
    window: int | None = None,
    overwrite: bool = False,
    index: bool = True,
    progress: bool = True,
) -> WriteReport:
    """Write ``source`` into shards named by ``out`` (printf ``%06d`` or brace pattern), each with its DALI index,
    plus ``classes.json`` (labelled sources) and ``shardset.json`` (the record; see ``pipeline.shardset``).

    ``on_error``: 'stop' raises ``ShardError`` naming the first bad input; 'skip' leaves bad inputs out and lists
    them in the report and the record. ``workers`` processes prepare images with at most ``window`` inputs in
    flight (default 32 per worker). An interrupted write of the same source with the same settings resumes
    after its last finished shard; a finished one is left as it is; shards of a different write are refused
    unless ``overwrite``."""
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    if workers < 1 or (window is not None and window < 1):
        raise ShardError(f"--workers and --window must be >= 1, got {workers} and {window}")
    policy = policy or ImagePolicy()
    pattern = output_pattern(out)
    if source.kind in ("images", "folder"):
        check_outside(Path(pattern).parent, Path(source.location))
    directory = writable_directory(Path(pattern).parent)
    if source.problems and on_error == "stop":
        path, reason = source.problems[0]
        more = f" ({len(source.problems) - 1} more such problem(s))" if len(source.problems) > 1 else ""
        raise ShardError(f"{path}: {reason}{more} (pass --on_error skip to leave such inputs out)")
    labelled = source.labels is not None
    record = {
        "format": SET_FORMAT,
        "complete": False,
        "pattern": Path(pattern).name,
        "labelled": labelled,
        "num_classes": len(source.classes) if labelled else None,
        "source": {
            "kind": source.kind,
            "location": source.location,
            "inputs": len(source),
            "fingerprint": source.fingerprint(),
            "order_seed": source.seed,
        },
        "settings": {**asdict(policy), "max_count": max_count, "max_bytes": max_bytes},
    }
    try:
        existing = read_set_record(directory)
    except ShardError:
        if not overwrite:
            raise
        existing = None  # an unreadable record is replaced with the rest
    kept = _resume_point(directory, pattern, existing, record, overwrite)
    _remove_stale_temporaries(directory, pattern)
    if existing is not None and existing.get("complete") and not overwrite:
        return _report(directory, existing, resumed=len(kept), finished_before=True)
    record["shards"] = list(kept)
    record["pre_read_problems"] = source.problems
    record.update(summarize_shards(kept))
    write_classes(directory, None)  # written when the set is complete: a classes.json means a finished labelled set
    write_set_record(directory, record)

    def shard_done(shard) -> None:
        record["shards"].append(asdict(shard))
        record.update(summarize_shards(record["shards"]))
        write_set_record(directory, record)

    start = record["inputs_done"]
    window = window or 32 * workers
    payloads = (source.payload(position) for position in range(start, len(source)))
    results = ordered_map(prepare_chunk, payloads, workers, window, policy)
    bar = tqdm(total=len(source), initial=start, desc=f"writing {Path(pattern).name}", unit="img", disable=not progress)
    try:
        with ShardWriter(
            pattern, first=len(kept), max_count=max_count, max_bytes=max_bytes, index=index, on_shard=shard_done
        ) as writer:
            for position, result in zip(range(start, len(source)), results):
                path = source.paths[position]
                if isinstance(result, str):
                    where = source.payload(position) if not source.pixels else f"{source.location}: {path}"
                    if on_error == "stop":
                        raise ShardError(
                            f"{where}: {result} (pass --on_error skip to leave such inputs out; "
                            "finished shards are kept and the same command resumes after them)"
                        )
                    writer.skip(str(where), result)
                else:
                    label = source.labels[position] if labelled else None
                    writer.add(path_key(path), sample_members(result.data, result.ext, label, path), result.changes)
                bar.update()
    finally:
        results.close()
        bar.close()
    if not record["shards"]:
        raise ShardError(f"no samples were written to {out}: every input was skipped")
    record["trailing_skipped"] = writer.trailing_skips
    record.update(summarize_shards(record["shards"]))
    record["skipped"] = source.problems + record["skipped"] + writer.trailing_skips
    record["inputs_done"] += len(writer.trailing_skips)
    record["complete"] = True
    write_classes(directory, source.classes if labelled else None)
    write_set_record(directory, record)
    return _report(directory, record, resumed=len(kept))


def _report(directory: Path, record: dict, resumed: int, finished_before: bool = False) -> WriteReport:
    return WriteReport(
        written=record["num_samples"],
        skipped=[tuple(s) for s in record.get("skipped", [])],
        shards=[directory / s["name"] for s in record["shards"]],
        resumed_from=resumed,
        changes=record.get("changes", {}),
        copied=record.get("copied", 0),
        finished_before=finished_before,
    )


# --------------------------------------------------------------------------- in-memory helpers (tests, benchmarks)


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    """uint8 pixels -> JPEG bytes (PIL's defaults: 4:2:0)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def array_samples(
    images: np.ndarray, labels: np.ndarray, quality: int = 95, source: str = "arrays"
) -> Iterator[Sample]:
    """Encoded samples from uint8 arrays for ``pipeline.shardset.write_shards``: images (N, H, W, 3) or (N, H, W),
    labels (N,) non-negative ints; keys ``00000012``."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise ShardError(f"{source}: images must be uint8 (N, H, W[, 3]); got {images.dtype} {images.shape}")
    if len(labels) != len(images) or (np.asarray(labels) < 0).any():
        raise ShardError(
            f"{source}: need one non-negative label per image; got {len(labels)} labels for {len(images)} images"
        )
    for index, (image, label) in enumerate(zip(images, labels)):
        yield Sample(f"{index:08d}", encode_jpeg(image.squeeze(), quality), int(label), f"{source}[{index}]")


SHAPES = ("disc", "square", "triangle", "ring", "plus", "diamond", "cross", "half-disc", "bar", "two-dots")


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
            "two-dots": (np.hypot(x - 0.55 * r, y) < 0.4 * r) | (np.hypot(x + 0.55 * r, y) < 0.4 * r),
        }[SHAPES[label]]
        foreground = rng.uniform(0.0, 1.0, 3) + rng.normal(0, 0.04, (size, size, 3))
        background = rng.uniform(0.0, 1.0, 3) + rng.normal(0, 0.04, (size, size, 3))
        images[index] = np.clip(np.where(mask[..., None], foreground, background) * 255, 0, 255).astype(np.uint8)
    return images, labels

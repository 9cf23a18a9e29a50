"""Where images come from: a ``Source`` lists the inputs of a shard set in write order, with their source paths
and labels, and says how a worker reads each. Sources of image files live here:
- ``images_source``: every image under a folder, recursively, without labels (pretraining data);
- ``folder_source``: ``ROOT/CLASS/...`` (labels follow the sorted class-folder names);
- ``list_source``: a CSV/TSV of ``path[,label]`` rows (ImageNet's validation set, any custom split).
Sources of raw pixels (CIFAR, ``.npz`` arrays, the synthetic demo set) are in ``pipeline.shards.pixel_sources``;
``pipeline.shards.source_writer.write_source`` streams any source into shards.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .shardset import ShardError, normalized_path

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


def _walk_images(
    root: Path, top: Path, progress: bool = True
) -> tuple[list[str], list[tuple[str, str]]]:
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
        raise ShardError(
            f"image folder {root} holds no image files ({', '.join(sorted(IMAGE_FILE_SUFFIXES))})"
        )
    paths = _shuffled(paths, seed)
    return Source(
        "images",
        str(root.resolve()),
        paths,
        None,
        None,
        _file_payload(root, paths),
        problems,
        seed=seed,
    )


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
        raise ShardError(
            f"class-name file {path} cannot be read ({error.strerror or error})"
        ) from None
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


def list_source(
    list_file: Path, root: Path | None = None, classes_file: Path | None = None, seed: int = 0
) -> Source:
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
    rows, labelled = _list_rows(list_file)
    seen: dict[str, int] = {}
    items: list[tuple[str, str, int]] = []  # (path, label text, line number)
    for number, cells in rows:
        path = _listed_path(list_file, root, number, cells[0])
        if path in seen:
            raise ShardError(
                f"list file {list_file} lines {seen[path]} and {number} both list {path}"
            )
        seen[path] = number
        items.append((path, cells[1] if labelled else "", number))
    classes, labels = _list_labels(list_file, items, classes_file) if labelled else (None, None)
    exists = [(root / path).is_file() for path, _, _ in items]
    problems = [
        (str(root / path), "listed file does not exist")
        for (path, _, _), found in zip(items, exists)
        if not found
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


def _list_rows(list_file: Path) -> tuple[list[tuple[int, list[str]]], bool]:
    """The list's rows as (line number, stripped cells), header, blank and comment lines left out, and whether
    they carry labels; ``ShardError`` for an unreadable or empty list, or rows of mixed or bad widths."""
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
    return rows, widths == {2}


def _listed_path(list_file: Path, root: Path, number: int, path: str) -> str:
    """A listed path (relative to ``root``, or absolute inside it) as a normalized path relative to ``root``."""
    listed = path
    if os.path.isabs(path):
        relative = os.path.relpath(path, root)
        if relative.startswith(".."):
            raise ShardError(
                f"list file {list_file} line {number}: {path} is outside --root {root}"
            )
        path = relative
    try:
        return normalized_path(Path(path).as_posix())
    except ShardError:
        raise ShardError(
            f"list file {list_file} line {number}: path {listed!r} must name a file inside --root {root}"
        ) from None


def _list_labels(
    list_file: Path, items: list[tuple[str, str, int]], classes_file: Path | None
) -> tuple[list[str], list[int]]:
    """(class names, label per item) from the items' label texts: integers, or class names indexed by
    ``classes_file`` when given, else sorted."""
    names = read_class_names(classes_file) if classes_file else None
    if all(label.isdigit() for _, label, _ in items):
        labels = [int(label) for _, label, _ in items]
        classes = names or [str(i) for i in range(max(labels) + 1)]
        beyond = next((number for _, label, number in items if int(label) >= len(classes)), None)
        if beyond is not None:
            raise ShardError(
                f"list file {list_file} line {beyond}: label beyond the {len(classes)} classes of {classes_file}"
            )
        return classes, labels
    classes = names or sorted({label for _, label, _ in items})
    lookup = {name: index for index, name in enumerate(classes)}
    unknown = next(((number, label) for _, label, number in items if label not in lookup), None)
    if unknown:
        raise ShardError(
            f"list file {list_file} line {unknown[0]}: class {unknown[1]!r} is not in {classes_file}"
        )
    return classes, [lookup[label] for _, label, _ in items]

"""The shard set on disk: WebDataset tars, their DALI indexes and class names; writing, indexing, verifying.

A shard is a POSIX tar of samples ``{key}.jpg`` + ``{key}.cls`` (the label as ASCII digits, the
WebDataset convention), written with ``webdataset.ShardWriter`` so that any WebDataset reader can read it.
Beside each ``NAME.tar`` lies ``NAME.idx``, DALI's index (format v1.2), so DALI's reader never scans tars
at start-up, and beside the set a ``classes.json`` with the class names in label order.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

# The members a sample's image may be stored as (what DALI's decoder and the verifier read).
IMAGE_COMPONENTS = ("jpg", "jpeg", "png", "webp")
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



def read_labels(shards) -> dict[str, int]:
    """key -> label of every sample, read from the ``.cls`` members through the DALI indexes (a few bytes
    per sample, no image is read). Raises ``ShardError`` naming the shard of a sample without a label,
    and a key that occurs twice (a subset by key needs unique keys)."""
    labels: dict[str, int] = {}
    for tar in shard_paths(shards):
        index = read_index(tar)
        with open(tar, "rb") as handle:
            for sample in index.samples:
                key = sample_key(next(iter(sample.values()))[2])
                if "cls" not in sample:
                    raise ShardError(f"shard {tar}: sample key {key} has no label (.cls); this needs labelled shards")
                offset, size, _ = sample["cls"]
                handle.seek(offset)
                text = handle.read(size).decode(errors="replace").strip()
                if not text.isdigit():
                    raise ShardError(f"shard {tar} key {key}: label {text!r} is not a non-negative integer")
                if key in labels:
                    raise ShardError(f"shard {tar}: key {key} occurs twice in the shard set; labels are looked up by key")
                labels[key] = int(text)
    return labels


def count_classes(*shard_sets) -> int:
    """The number of classes of labelled shard sets: the names in ``classes.json`` beside the first set's
    shards when present, else one more than the largest label of any set (read through the indexes: a few
    bytes per sample, no image decoded)."""
    paths = [shard_paths(shards) for shards in shard_sets]
    names = read_classes(paths[0])
    if names:
        return len(names)
    return 1 + max(max(read_labels(p).values()) for p in paths)


# --------------------------------------------------------------------------- write


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
            image_ext = next((e for e in parts if e.lower() in IMAGE_COMPONENTS), None)
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


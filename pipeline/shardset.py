"""The shard set on disk: WebDataset tars, their DALI indexes, class names and the set's record; writing
shards atomically, indexing, verifying.

A shard is a POSIX tar of samples, each three members sharing the sample's key:
- ``{key}.jpg`` (or ``.png`` for raw pixels stored losslessly): the image;
- ``{key}.cls``: the label as ASCII digits (the WebDataset convention); labelled sets only;
- ``{key}.json``: ``{"path": SOURCE_PATH}``, where the sample came from (a path relative to the source
  folder or list, ``data_batch_3/01234`` for CIFAR, the index for arrays).
Beside each ``NAME.tar`` lies ``NAME.idx``, DALI's index (format v1.2), so DALI's reader never scans tars
at start-up; beside the set a ``classes.json`` (labelled sets: class names in label order) and a
``shardset.json`` (what was written from what, how images were stored, per-shard progress: the journal
that lets an interrupted ``write`` resume).

Keys. WebDataset cuts a key at the first dot of a member's base name and DALI's index is split at
spaces, so a key derived from a source path escapes every byte of its UTF-8 form outside
``[A-Za-z0-9_-/]`` as ``%XX`` (uppercase hex): ``n01440764/n01440764_10026.JPEG`` ->
``n01440764/n01440764_10026%2EJPEG``, ``my photos/é.png`` -> ``my%20photos/%C3%A9%2Epng``. The rule is
injective (distinct paths give distinct keys), stable, and ``key_path`` reverses it.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import braceexpand
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from common.files import atomic_write_text, fsync_directory

# The members a sample's image may be stored as (what DALI's decoder and the verifier read).
IMAGE_COMPONENTS = ("jpg", "jpeg", "png", "webp")
# Image formats DALI's decoders read (GIF is not one of them).
DALI_FORMATS = {"JPEG", "PNG", "WEBP", "TIFF", "BMP", "PPM", "JPEG2000"}
INDEX_VERSION = "v1.2"
SET_FILE = "shardset.json"
CLASSES_FILE = "classes.json"
SET_FORMAT = 1
DEFAULT_MAX_COUNT = 1000
DEFAULT_MAX_BYTES = 1e9


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


_PRINTF_NUMBER = re.compile(r"%0?\d*d")


def output_pattern(out: str) -> str:
    """A printf pattern with exactly one shard number from ``train-%06d.tar`` or ``train-{000000..999999}.tar``.

    Raises ``ShardError`` for a pattern with no number, two numbers, or another ``%`` conversion."""
    out = str(out)
    braces = list(re.finditer(r"\{(\d+)\.\.(\d+)\}", out))
    if braces:
        if len(braces) > 1:
            raise ShardError(f"output pattern {out!r} has {len(braces)} brace ranges: give exactly one shard number")
        if _PRINTF_NUMBER.search(out):
            raise ShardError(f"output pattern {out!r} mixes a brace range and a % conversion: give one shard number")
        match = braces[0]  # in brace notation a '%' is a literal character
        out = (
            out[: match.start()].replace("%", "%%")
            + f"%0{len(match.group(1))}d"
            + out[match.end() :].replace("%", "%%")
        )
    conversions = re.findall(r"%(?:%|[^%]*?[a-zA-Z])", out)
    numbers = [c for c in conversions if _PRINTF_NUMBER.fullmatch(c)]
    others = [c for c in conversions if c != "%%" and not _PRINTF_NUMBER.fullmatch(c)]
    if others:
        raise ShardError(
            f"output pattern {out!r} has a conversion {others[0]!r}: only one shard number (%06d) is allowed"
        )
    if len(numbers) != 1:
        raise ShardError(
            f"output pattern {out!r} has {len(numbers)} shard numbers: give exactly one, "
            "e.g. train-%06d.tar or train-{000000..999999}.tar"
        )
    if Path(out % 0).parent != Path(out % 1).parent:
        raise ShardError(f"output pattern {out!r} puts its shard number in a directory name: number the file name")
    if not (out % 0).endswith(".tar"):
        raise ShardError(f"output pattern {out!r} must end in .tar")
    return out


# --------------------------------------------------------------------------- keys


_KEY_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_KEY_PATTERN = re.compile(r"(?:[A-Za-z0-9_-]|%[0-9A-F]{2})+(?:/(?:[A-Za-z0-9_-]|%[0-9A-F]{2})+)*")


def path_key(path: str) -> str:
    """The sample key of a relative source path: each '/'-separated part's UTF-8 bytes outside ``[A-Za-z0-9_-]``
    as ``%XX`` (so no dot, space or non-ASCII byte reaches a tar member name or DALI's index)."""
    parts = normalized_path(path).split("/")
    return "/".join(
        "".join(chr(b) if b in _KEY_SAFE else f"%{b:02X}" for b in part.encode("utf-8", "surrogateescape"))
        for part in parts
    )


def key_path(key: str) -> str:
    """The source path a key was made from (the inverse of ``path_key``)."""
    return urllib.parse.unquote(key, errors="surrogateescape")


def normalized_path(path: str) -> str:
    """A relative POSIX path without empty, '.' or '..' parts; raises ``ShardError`` otherwise."""
    parts = [p for p in str(path).split("/") if p not in ("", ".")]
    if not parts or str(path).startswith("/") or ".." in parts:
        raise ShardError(f"source path {path!r} must be relative, inside its root, and name a file")
    return "/".join(parts)


def check_key(key: str) -> str:
    """``key`` if it is a valid escaped key (see the module docstring), else ``ShardError``."""
    if not _KEY_PATTERN.fullmatch(key):
        raise ShardError(
            f"sample key {key!r} is not a valid key: use pipeline.shardset.path_key "
            "(letters, digits, _ - / and %XX escapes)"
        )
    return key


def sample_key(member_name: str) -> str:
    """``000123.jpg`` -> ``000123`` (WebDataset: the key is the name up to the first dot of the base name)."""
    directory, _, base = member_name.rpartition("/")
    return (directory + "/" if directory else "") + base.split(".", 1)[0]


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
                if any(ch.isspace() for ch in name):
                    raise ShardError(
                        f"shard {tar}: member {name!r} has white space in its name (DALI's index cannot hold it)"
                    )
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
        raise ShardError(
            f"shard {tar} is truncated or damaged: no end-of-archive marker after its last member (byte {archive_end})"
        )
    return samples


def index_text(tar: Path) -> str:
    """DALI's index of ``tar`` (v1.2: a header, then ``ext offset size name`` per component of each sample)."""
    return ShardIndex(
        tar, [{ext: (offset, size, name) for ext, offset, size, name in sample} for sample in build_index(tar)]
    ).text()


def write_index(tar: Path) -> Path:
    """Write DALI's index beside ``tar``; atomic and fsynced (common.files)."""
    return atomic_write_text(index_path(tar), index_text(tar))


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
        lines += [
            " ".join(f"{ext} {offset} {size} {name}" for ext, (offset, size, name) in sample.items())
            for sample in self.samples
        ]
        return "\n".join(lines) + "\n"


def read_index(tar: Path) -> ShardIndex:
    """Parse and sanity-check ``tar``'s index (exists, well formed, consistent with the tar's size)."""
    idx = index_path(tar)
    if not idx.exists():
        raise ShardError(f"shard {tar} has no index {idx}; create it with: python -m pipeline.shards index {tar}")
    lines = idx.read_text().splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ShardError(
            f"index {idx} has a bad header {lines[:1]}; rebuild it with: python -m pipeline.shards index {tar}"
        )
    count = int(header[1])
    if count == 0 or len(lines) - 1 != count:
        raise ShardError(f"index {idx} says {count} samples but lists {len(lines) - 1}; rebuild it")
    samples = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) % 4:
            raise ShardError(f"index {idx} has a malformed line {line!r}; rebuild it")
        samples.append(
            {fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields), 4)}
        )
    size = tar.stat().st_size
    end = max(offset + length for sample in samples for offset, length, _ in sample.values())
    if end > size:
        raise ShardError(f"shard {tar} is truncated: its index reaches byte {end} but the file has {size} bytes")
    return ShardIndex(tar, samples)


# --------------------------------------------------------------------------- the set's files: classes and record


def read_classes(shards: list[Path]) -> list[str] | None:
    """Class names from ``classes.json`` beside the first shard, if present."""
    path = shards[0].parent / CLASSES_FILE
    return json.loads(path.read_text())["classes"] if path.exists() else None


def read_set_record(directory: Path) -> dict | None:
    """The ``shardset.json`` of a directory (None if absent); ``ShardError`` if unreadable."""
    path = Path(directory) / SET_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or record.get("format") != SET_FORMAT:
            raise ValueError(f"unknown format {record.get('format') if isinstance(record, dict) else record!r}")
        return record
    except (OSError, ValueError) as error:
        raise ShardError(f"{path} is not a shard-set record written by pipeline.shards ({error})") from None


def is_labelled(shards: list[Path]) -> bool:
    """Whether a set's samples must carry labels: its ``shardset.json`` says so; without one (older or
    third-party sets), a ``classes.json`` beside the shards marks a labelled set."""
    record = read_set_record(shards[0].parent)
    if record is not None:
        return bool(record["labelled"])
    return (shards[0].parent / CLASSES_FILE).exists()


def _read_member(shards, ext: str, what: str, decode: Callable[[str, Path, str], object]) -> dict[str, object]:
    """key -> decode(text, tar, key) of member ``ext`` of every sample, read through the DALI indexes (a few
    bytes per sample, no image read). ``ShardError`` names a sample without it and a key that occurs twice."""
    values: dict[str, object] = {}
    for tar in shard_paths(shards):
        index = read_index(tar)
        with open(tar, "rb") as handle:
            for sample in index.samples:
                key = sample_key(next(iter(sample.values()))[2])
                if ext not in sample:
                    raise ShardError(
                        f"shard {tar}: sample key {key} has no {what} (.{ext}); {MISSING_MEMBER_HINT[ext]}"
                    )
                offset, size, _ = sample[ext]
                handle.seek(offset)
                value = decode(handle.read(size).decode("utf-8", errors="replace"), tar, key)
                if key in values:
                    raise ShardError(
                        f"shard {tar}: key {key} occurs twice in the shard set; samples are looked up by key"
                    )
                values[key] = value
    return values


MISSING_MEMBER_HINT = {
    "cls": "this needs labelled shards",
    "json": "the shards were written without source paths: rewrite them with `python -m pipeline.shards write`",
}


def _label(text: str, tar: Path, key: str) -> int:
    text = text.strip()
    if not text.isdigit():
        raise ShardError(f"shard {tar} key {key}: label {text!r} is not a non-negative integer")
    return int(text)


def _source_path(text: str, tar: Path, key: str) -> str:
    try:
        return str(json.loads(text)["path"])
    except (ValueError, KeyError, TypeError):
        raise ShardError(f"shard {tar} key {key}: its .json member holds no source path ({text[:80]!r})") from None


def read_labels(shards) -> dict[str, int]:
    """key -> label of every sample, from the ``.cls`` members (``ShardError`` names a sample without one)."""
    return _read_member(shards, "cls", "label", _label)


def read_source_paths(shards) -> dict[str, str]:
    """key -> source path of every sample, from the ``.json`` members."""
    return _read_member(shards, "json", "source path", _source_path)


def count_classes(*shard_sets) -> int:
    """The number of classes of labelled shard sets: the names in ``classes.json`` beside the first set's
    shards when present, else one more than the largest label of any set (read through the indexes: a few
    bytes per sample, no image decoded)."""
    paths = [shard_paths(shards) for shards in shard_sets]
    names = read_classes(paths[0])
    if names:
        return len(names)
    return 1 + max(max(read_labels(p).values()) for p in paths)


# --------------------------------------------------------------------------- writing shards


@dataclass
class ShardRecord:
    """A finished shard, as the set's record (``shardset.json``) lists it."""

    name: str
    samples: int
    inputs: int  # inputs consumed: samples + inputs skipped while this shard was open
    bytes: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    changes: dict[str, int] = field(default_factory=dict)  # why images were re-encoded -> count
    copied: int = 0  # images stored byte-identical


class ShardWriter:
    """Samples into numbered shards ``pattern % n`` (n from ``first``), at most ``max_count`` samples and about
    ``max_bytes`` bytes each. A shard is written to ``NAME.tmp``, closed, fsynced, indexed (``NAME.idx``,
    atomically), then renamed to ``NAME`` and its directory fsynced; only then is ``on_shard(record)`` called.
    So a shard under its final name is always complete and indexed; ``abort`` (or any exception inside a
    ``with`` block) removes the open temporary and leaves finished shards as they are."""

    def __init__(
        self,
        pattern: str,
        first: int = 0,
        max_count: int = DEFAULT_MAX_COUNT,
        max_bytes: float = DEFAULT_MAX_BYTES,
        index: bool = True,
        on_shard: Callable[[ShardRecord], None] | None = None,
    ):
        if max_count < 1 or max_bytes <= 0:
            raise ValueError(f"max_count must be >= 1 and max_bytes > 0, got {max_count}, {max_bytes}")
        self.pattern, self.number, self.max_count, self.max_bytes = pattern, first, max_count, max_bytes
        self.index, self.on_shard = index, on_shard
        self.records: list[ShardRecord] = []
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._open: ShardRecord | None = None
        self._pending_skips: list[tuple[str, str]] = []  # skipped before the next shard opens

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    @property
    def _tmp(self) -> Path:
        return Path(self.pattern % self.number + ".tmp")

    def _start(self) -> None:
        name = self.pattern % self.number
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._open = ShardRecord(Path(name).name, 0, len(self._pending_skips), 0, list(self._pending_skips))
        self._pending_skips = []

    def add(self, key: str, members: dict[str, bytes], changes: Iterable[str] = ()) -> None:
        """One sample: ``members`` maps extension -> bytes (image first); ``changes``: why its image was re-encoded."""
        check_key(key)
        size = sum(512 + -(-len(data) // 512) * 512 for data in members.values())
        if self._open and (self._open.samples >= self.max_count or self._file.tell() + size > self.max_bytes):
            self._finish()
        if not self._open:
            self._start()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444  # a fixed mtime: the same inputs give the same bytes
            self._tar.addfile(info, io.BytesIO(data))
        changes = list(changes)
        self._open.samples += 1
        self._open.inputs += 1
        if changes:
            for change in changes:
                self._open.changes[change] = self._open.changes.get(change, 0) + 1
        else:
            self._open.copied += 1

    def skip(self, source: str, reason: str) -> None:
        """An input left out; it counts towards the open shard's inputs (so a resumed write starts after it)."""
        if self._open:
            self._open.skipped.append((source, reason))
            self._open.inputs += 1
        else:
            self._pending_skips.append((source, reason))

    def _finish(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tar = self._file = None
        tmp, final = self._tmp, Path(self.pattern % self.number)
        if self.index:
            atomic_write_text(index_path(final), index_text(tmp))  # the index first: a final-named shard always has one
        else:
            index_path(final).unlink(missing_ok=True)  # an index of an earlier shard of this name would be stale
        os.replace(tmp, final)
        fsync_directory(final.parent)
        record, self._open = self._open, None
        record.bytes = final.stat().st_size
        self.records.append(record)
        self.number += 1
        if self.on_shard:
            self.on_shard(record)

    def close(self) -> list[ShardRecord]:
        """Finish the open shard; returns every shard this writer finished."""
        if self._open:
            self._finish()
        return self.records

    @property
    def trailing_skips(self) -> list[tuple[str, str]]:
        """Inputs skipped after the last finished shard when no sample followed them."""
        return list(self._pending_skips)

    def abort(self) -> None:
        """Drop the open shard's temporary file, and its index if one was written before the failure (finished
        shards stay)."""
        if self._file is not None:
            self._file.close()
        self._tar = self._file = None
        if self._open:
            self._tmp.unlink(missing_ok=True)
            final = Path(self.pattern % self.number)
            if not final.exists():
                index_path(final).unlink(missing_ok=True)
        self._open = None


def remove_shard(path: Path) -> None:
    """A shard, its index and a leftover temporary, if present."""
    for stale in (path, index_path(path), Path(str(path) + ".tmp")):
        stale.unlink(missing_ok=True)


def write_set_record(directory: Path, record: dict) -> None:
    atomic_write_text(Path(directory) / SET_FILE, json.dumps(record, indent=1, ensure_ascii=False) + "\n")


def write_classes(directory: Path, classes: list[str] | None) -> None:
    """``classes.json`` for a labelled set; removes a stale one for an unlabelled set."""
    path = Path(directory) / CLASSES_FILE
    if classes is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_text(path, json.dumps({"classes": list(classes)}, indent=1, ensure_ascii=False) + "\n")


def summarize_shards(records: list[dict]) -> dict:
    """Totals over ``shardset.json`` shard records: samples, skipped inputs, how images were stored."""
    changes: Counter = Counter()
    for record in records:
        changes.update(record["changes"])
    return {
        "num_samples": sum(r["samples"] for r in records),
        "inputs_done": sum(r["inputs"] for r in records),
        "copied": sum(r["copied"] for r in records),
        "re_encoded": sum(r["samples"] - r["copied"] for r in records),
        "changes": dict(sorted(changes.items())),
        "skipped": [s for r in records for s in r["skipped"]],
    }


@dataclass
class Sample:
    """An encoded sample for ``write_shards``: ``label`` None in an unlabelled set; ``source``: where it came
    from (stored as the sample's source path); ``ext``: the image member's extension."""

    key: str
    image: bytes
    label: int | None
    source: str
    ext: str = "jpg"


@dataclass
class WriteReport:
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    shards: list[Path] = field(default_factory=list)
    resumed_from: int = 0  # shards kept from an interrupted write
    changes: dict[str, int] = field(default_factory=dict)
    copied: int = 0
    finished_before: bool = False  # the set was already complete: nothing was written


def sample_members(image: bytes, ext: str, label: int | None, source: str) -> dict[str, bytes]:
    """The members of one stored sample: image, label (labelled sets), source path."""
    members = {ext: image}
    if label is not None:
        if label < 0:
            raise ShardError(f"{source}: negative label {label}")
        members["cls"] = str(label).encode()
    members["json"] = json.dumps({"path": source}, ensure_ascii=False).encode()
    return members


def write_shards(
    samples: Iterable[Sample],
    out: str,
    classes: list[str] | None,
    total: int | None = None,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: float = DEFAULT_MAX_BYTES,
    index: bool = True,
    progress: bool = True,
) -> WriteReport:
    """Write already-encoded ``samples`` into shards named by ``out`` (printf ``%06d`` or brace pattern), each
    indexed, plus ``classes.json`` (``classes`` None: an unlabelled set) and ``shardset.json``. Every sample's
    label must be None exactly when ``classes`` is None. For sources read from disk with checks, re-encoding,
    parallel workers and resumption use ``pipeline.sources.write_source``."""
    pattern = output_pattern(out)
    directory = Path(pattern).parent
    directory.mkdir(parents=True, exist_ok=True)
    labelled = classes is not None
    with ShardWriter(pattern, max_count=max_count, max_bytes=max_bytes, index=index) as writer:
        for sample in tqdm(
            samples, total=total, desc=f"writing {Path(pattern).name}", unit="img", disable=not progress
        ):
            if (sample.label is not None) != labelled:
                raise ShardError(
                    f"{sample.source}: {'no label' if labelled else 'a label'} "
                    f"in {'a labelled' if labelled else 'an unlabelled'} set"
                )
            writer.add(sample.key, sample_members(sample.image, sample.ext, sample.label, sample.source))
    records = writer.records
    if not records:
        raise ShardError(f"no samples were written to {out}")
    write_classes(directory, classes)
    shard_records = [asdict(r) for r in records]
    write_set_record(
        directory,
        {
            "format": SET_FORMAT,
            "complete": True,
            "pattern": Path(pattern).name,
            "labelled": labelled,
            "num_classes": len(classes) if labelled else None,
            "source": {"kind": "samples"},
            "settings": {"max_count": max_count, "max_bytes": max_bytes},
            **summarize_shards(shard_records),
            "shards": shard_records,
        },
    )
    return WriteReport(written=sum(r.samples for r in records), shards=[directory / r.name for r in records])


def index_shards(shards: list[Path], progress: bool = True) -> None:
    for tar in tqdm(shards, desc="indexing", unit="shard", disable=not progress or len(shards) < 2):
        write_index(tar)


# --------------------------------------------------------------------------- verify


def check_image(data: bytes) -> tuple[bool, str]:
    """Decode fully (at 1/8 scale through JPEG DCT scaling, which still reads every byte) -> (ok, reason);
    a format DALI cannot decode (GIF) is a problem too."""
    if not data:
        return False, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except UnidentifiedImageError:
        return False, "not a decodable image (unknown format, or truncated before the image header ends)"
    except Exception as error:  # PIL raises OSError/SyntaxError/ValueError... for bad data
        text = str(error)
        if "truncated" in text.lower():
            return False, f"truncated image data ({text})"
        return False, f"corrupt image ({type(error).__name__}: {text})"
    if image_format not in DALI_FORMATS:
        return (
            False,
            f"{image_format} data, which DALI's decoder cannot read; "
            "rewrite the set with `python -m pipeline.shards write`",
        )
    return True, ""


def verify_shard(tar: Path, require_labels: bool = True) -> tuple[int, list[str], list[str]]:
    """Check a shard: its index matches the tar, every sample has a decodable image (and a label when
    ``require_labels``; a label that is present must parse either way). Returns (samples, problems, keys)
    where each problem names the shard and key."""
    problems = []
    try:
        actual = build_index(tar)
    except ShardError as error:
        return 0, [str(error)], []
    try:
        indexed = read_index(tar)
        if [[c[1:3] for c in s] for s in actual] != [
            sorted(((o, n) for o, n, _ in s.values())) for s in indexed.samples
        ]:
            problems.append(f"shard {tar}: index {index_path(tar)} does not match the tar; rebuild it with `index`")
    except ShardError as error:
        problems.append(str(error))
    keys = []
    with open(tar, "rb") as handle:
        for sample in actual:
            key = sample_key(sample[0][3])
            keys.append(key)
            parts = {ext: (offset, size) for ext, offset, size, _ in sample}
            image_ext = next((e for e in parts if e.lower() in IMAGE_COMPONENTS), None)
            if image_ext is None:
                problems.append(f"shard {tar} key {key}: no image component (has {sorted(parts)})")
            else:
                handle.seek(parts[image_ext][0])
                ok, reason = check_image(handle.read(parts[image_ext][1]))
                if not ok:
                    problems.append(f"shard {tar} key {key}: image does not decode ({reason})")
            if "cls" in parts:
                handle.seek(parts["cls"][0])
                text = handle.read(parts["cls"][1]).decode("ascii", "replace").strip()
                if not text.isdigit():
                    problems.append(f"shard {tar} key {key}: label {text!r} is not a non-negative integer")
            elif require_labels:
                problems.append(f"shard {tar} key {key}: no label (.cls) component")
            if "json" in parts:
                handle.seek(parts["json"][0])
                try:
                    _source_path(handle.read(parts["json"][1]).decode("utf-8", "replace"), tar, key)
                except ShardError as error:
                    problems.append(str(error))
    return len(actual), problems, keys


def verify_shards(
    shards: list[Path], require_labels: bool = True, progress: bool = True, workers: int | None = None
) -> tuple[int, list[str]]:
    """(samples, problems) over ``shards``, checked in ``workers`` processes; a key in two shards is a problem."""
    if workers is not None and workers < 1:
        raise ShardError(f"--workers must be >= 1, got {workers}")
    total, problems, first_seen = 0, [], {}
    with ProcessPoolExecutor(max_workers=min(workers or os.cpu_count(), max(1, len(shards)))) as pool:
        results = pool.map(verify_shard, shards, [require_labels] * len(shards))
        for tar, (count, found, keys) in tqdm(
            zip(shards, results), total=len(shards), desc="verifying", unit="shard", disable=not progress
        ):
            total += count
            problems += found
            for key in keys:
                if first_seen.setdefault(key, tar) != tar:
                    problems.append(f"shard {tar} key {key}: the key occurs in shard {first_seen[key]} too")
    return total, problems


def describe_set(shards: list[Path]) -> list[str]:
    """Lines saying what the set's record says about the set (how it was written, how images were stored),
    and problems with it (an unfinished write, listed shards that are missing)."""
    directory = shards[0].parent
    record = read_set_record(directory)
    if record is None:
        return [
            f"set: no {SET_FILE} beside the shards (written by another tool or an older version); "
            + (
                "labels required (classes.json present)"
                if (directory / CLASSES_FILE).exists()
                else "labels not required (no classes.json)"
            )
        ]
    source, settings = record.get("source", {}), record.get("settings", {})
    labelled = f"labelled ({record.get('num_classes')} classes)" if record["labelled"] else "unlabelled"
    lines = [
        f"set: {record.get('num_samples', 0)} samples from {source.get('kind')} {source.get('location', '')}".rstrip()
        + f", {labelled}"
    ]
    if "quality" in settings:
        encoding = "PNG" if settings.get("pixel_format") == "png" and source.get("kind") in PIXEL_SOURCES else "JPEG"
        changes = ", ".join(f"{reason} {count}" for reason, count in record.get("changes", {}).items())
        lines.append(
            f"images: {record.get('copied', 0)} stored byte-identical, {record.get('re_encoded', 0)} encoded "
            f"({changes or 'none'}) as {encoding} quality {settings['quality']}, "
            f"chroma {SUBSAMPLING_WORDS.get(settings['subsampling'], settings['subsampling'])}"
        )
        limit = (
            f"max side {settings['max_side']} px"
            if settings.get("max_side")
            else f"shorter side {settings['shorter_side']} px"
            if settings.get("shorter_side")
            else "none"
        )
        lines.append(
            f"pre-resize at write time: {limit} ({record.get('changes', {}).get('resized', 0)} images resized)"
        )
    if record.get("skipped"):
        lines.append(f"skipped at write time: {len(record['skipped'])} input(s), listed in {directory / SET_FILE}")
    if not record.get("complete"):
        lines.append(
            f"problem: the write of this set did not finish ({record.get('inputs_done', 0)} of "
            f"{source.get('inputs', '?')} inputs); rerun the same `write` command to resume it"
        )
    missing = [r["name"] for r in record.get("shards", []) if not (directory / r["name"]).exists()]
    if missing:
        lines.append(f"problem: {len(missing)} shard(s) listed in {SET_FILE} are missing, e.g. {missing[:3]}")
    return lines


PIXEL_SOURCES = ("cifar", "arrays", "synthetic")
SUBSAMPLING_WORDS = {
    "auto": "as each source JPEG, 4:4:4 for other formats",
    "444": "4:4:4",
    "422": "4:2:2",
    "420": "4:2:0",
}

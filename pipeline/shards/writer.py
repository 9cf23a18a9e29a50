"""Writing a shard set: ``ShardWriter`` (numbered shards, each written to a temporary, fsynced, indexed and
renamed into place), the set's files (``classes.json``, ``shardset.json`` and its per-shard records), and
``write_shards`` for samples already encoded in memory. The layout is described in ``pipeline.shards.shardset``;
streaming a ``Source`` from disk, with workers and resumption, is ``pipeline.shards.source_writer.write_source``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from ...common.files import atomic_write_text, fsync_directory
from .shardset import (
    CLASSES_FILE,
    SET_FILE,
    SET_FORMAT,
    ShardError,
    check_key,
    index_path,
    index_text,
    output_pattern,
    unsafe_member_name,
)

DEFAULT_MAX_COUNT = 1000
DEFAULT_MAX_BYTES = 1e9


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
            raise ValueError(
                f"max_count must be >= 1 and max_bytes > 0, got {max_count}, {max_bytes}"
            )
        self.pattern, self.number, self.max_count, self.max_bytes = (
            pattern,
            first,
            max_count,
            max_bytes,
        )
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
        self._open = ShardRecord(
            Path(name).name, 0, len(self._pending_skips), 0, list(self._pending_skips)
        )
        self._pending_skips = []

    def add(self, key: str, members: dict[str, bytes], changes: Iterable[str] = ()) -> None:
        """One sample: ``members`` maps extension -> bytes (image first); ``changes``: why its image was re-encoded."""
        check_key(key)
        size = sum(512 + -(-len(data) // 512) * 512 for data in members.values())
        if self._open and (
            self._open.samples >= self.max_count or self._file.tell() + size > self.max_bytes
        ):
            self._finish()
        if not self._open:
            self._start()
        for ext in members:
            unsafe = unsafe_member_name(f"{key}.{ext}") or (
                "a '/' in its extension" if "/" in ext else None
            )
            if unsafe:
                raise ShardError(
                    f"sample key {key}: member name {key}.{ext!r} has {unsafe}; refused"
                )
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = (
                len(data),
                0,
                0o444,
            )  # a fixed mtime: the same inputs give the same bytes
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
            atomic_write_text(
                index_path(final), index_text(tmp)
            )  # the index first: a final-named shard always has one
        else:
            index_path(final).unlink(
                missing_ok=True
            )  # an index of an earlier shard of this name would be stale
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
    atomic_write_text(
        Path(directory) / SET_FILE, json.dumps(record, indent=1, ensure_ascii=False) + "\n"
    )


def write_classes(directory: Path, classes: list[str] | None) -> None:
    """``classes.json`` for a labelled set; removes a stale one for an unlabelled set."""
    path = Path(directory) / CLASSES_FILE
    if classes is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_text(
            path, json.dumps({"classes": list(classes)}, indent=1, ensure_ascii=False) + "\n"
        )


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
    parallel workers and resumption use ``pipeline.shards.source_writer.write_source``."""
    pattern = output_pattern(out)
    directory = Path(pattern).parent
    directory.mkdir(parents=True, exist_ok=True)
    labelled = classes is not None
    with ShardWriter(pattern, max_count=max_count, max_bytes=max_bytes, index=index) as writer:
        for sample in tqdm(
            samples,
            total=total,
            desc=f"writing {Path(pattern).name}",
            unit="img",
            disable=not progress,
        ):
            if (sample.label is not None) != labelled:
                raise ShardError(
                    f"{sample.source}: {'no label' if labelled else 'a label'} "
                    f"in {'a labelled' if labelled else 'an unlabelled'} set"
                )
            writer.add(
                sample.key, sample_members(sample.image, sample.ext, sample.label, sample.source)
            )
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
    return WriteReport(
        written=sum(r.samples for r in records), shards=[directory / r.name for r in records]
    )

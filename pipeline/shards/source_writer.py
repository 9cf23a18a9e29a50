"""The streaming writer that turns a ``Source`` into a shard set: worker processes read, check and (re-)encode
images (``pipeline.shards.image_policy``) with at most ``window`` inputs in flight, the main process writes them
in input order (so the shards do not depend on the number of workers), and every finished shard is recorded in
``shardset.json``, so an interrupted write resumes where it stopped.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from ...common.files import check_writable
from ...common.processes import process_pool
from .image_policy import ImagePolicy, prepare_chunk
from .shardset import SET_FILE, SET_FORMAT, ShardError, output_pattern, path_key, read_set_record
from .sources import Source
from .writer import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_COUNT,
    ShardRecord,
    ShardWriter,
    WriteReport,
    remove_shard,
    sample_members,
    summarize_shards,
    write_classes,
    write_set_record,
)


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
    pool = process_pool(workers, "spawn")  # workers that die with this process, SIGKILL included
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
    return re.compile(
        re.escape(before.replace("\0", "%")) + r"\d+" + re.escape(after.replace("\0", "%"))
    )


def _pattern_files(pattern: str) -> list[Path]:
    """The shard paths (``NAME.tar``) of existing files whose names fit ``pattern``: shards, leftover ``NAME.tar.tmp``
    temporaries and indexes (``NAME.idx``, also one whose shard is gone)."""
    directory, regex = Path(pattern).parent, _shard_name(Path(pattern).name)
    if not directory.is_dir():
        return []
    names = {
        p.name.removesuffix(".tmp")
        if p.suffix == ".tmp"
        else p.stem + ".tar"
        if p.suffix == ".idx"
        else p.name
        for p in directory.iterdir()
    }
    return sorted(directory / name for name in names if regex.fullmatch(name))


def _remove_stale_temporaries(directory: Path, pattern: str) -> None:
    """Hidden temporaries ``common.files.atomic_path`` leaves when a process is killed mid-write (indexes, record)."""
    shard = _shard_name(Path(pattern).name)
    for path in directory.glob(".*.tmp"):
        target, has_index, _ = path.name[1:].partition(".idx.")
        if path.name[1:].startswith(SET_FILE + ".") or (
            has_index and shard.fullmatch(target + ".tar")
        ):
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
        same_count = (
            " (as many, but other files, labels or pixels)"
            if old.get("inputs") == now["inputs"]
            else ""
        )
        details.append(
            f"inputs: {old.get('kind')} {old.get('location')} with {old.get('inputs')} -> "
            f"{now['kind']} {now['location']} with {now['inputs']}{same_count}"
        )
    return details


def _resume_point(
    directory: Path, pattern: str, record: dict | None, new: dict, overwrite: bool, shipper=None
) -> list[dict]:
    """The finished shards to keep: those of an interrupted identical write (listed, present with the recorded
    size here, or shipped: ``shipper.has``). ``ShardError`` when ``directory`` holds another write's shards and
    ``overwrite`` is not set."""
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
        here = path.is_file() and path.stat().st_size == shard["bytes"]
        if not here and not (shipper and shipper.has(shard["name"], shard["bytes"])):
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
    shipper=None,
) -> WriteReport:
    """Write ``source`` into shards named by ``out`` (printf ``%06d`` or brace pattern), each with its DALI index,
    plus ``classes.json`` (labelled sources) and ``shardset.json`` (the record; see ``pipeline.shards.shardset``).

    ``on_error``: 'stop' raises ``ShardError`` naming the first bad input; 'skip' leaves bad inputs out and lists
    them in the report and the record. ``workers`` processes prepare images with at most ``window`` inputs in
    flight (default 32 per worker). An interrupted write of the same source with the same settings resumes
    after its last finished shard; a finished one is left as it is; shards of a different write are refused
    unless ``overwrite``.

    ``shipper`` (writing to a bucket: ``s3_cli.ShardShipper``): each finished shard is handed to
    ``shipper.ship(path)`` once it is in the record, which uploads it and removes the local copy (local space: the
    shard being written and the one being shipped); a shard the record lists that is gone from here counts as
    finished where ``shipper.has(name, size)``."""
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
        more = (
            f" ({len(source.problems) - 1} more such problem(s))"
            if len(source.problems) > 1
            else ""
        )
        raise ShardError(f"{path}: {reason}{more} (pass --on_error skip to leave such inputs out)")
    record = _new_record(
        source, pattern, {**asdict(policy), "max_count": max_count, "max_bytes": max_bytes}
    )
    try:
        existing = read_set_record(directory)
    except ShardError:
        if not overwrite:
            raise
        existing = None  # an unreadable record is replaced with the rest
    kept = _resume_point(directory, pattern, existing, record, overwrite, shipper)
    _remove_stale_temporaries(directory, pattern)
    if existing is not None and existing.get("complete") and not overwrite:
        return _report(directory, existing, resumed=len(kept), finished_before=True)
    record["shards"] = list(kept)
    record["pre_read_problems"] = source.problems
    record.update(summarize_shards(kept))
    write_classes(
        directory, None
    )  # written when the set is complete: a classes.json means a finished labelled set
    write_set_record(directory, record)
    writer = ShardWriter(
        pattern,
        first=len(kept),
        max_count=max_count,
        max_bytes=max_bytes,
        index=index,
        on_shard=lambda shard: _record_shard(directory, record, shard, shipper),
    )
    _stream(
        source,
        writer,
        policy,
        record["inputs_done"],
        on_error,
        workers,
        window or 32 * workers,
        progress,
    )
    if not record["shards"]:
        raise ShardError(f"no samples were written to {out}: every input was skipped")
    _complete(directory, record, source, writer.trailing_skips)
    return _report(directory, record, resumed=len(kept))


def _new_record(source: Source, pattern: str, settings: dict) -> dict:
    """The ``shardset.json`` of a write that has not started: what is written from what, with which settings."""
    labelled = source.labels is not None
    return {
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
        "settings": settings,
    }


def _record_shard(directory: Path, record: dict, shard: ShardRecord, shipper=None) -> None:
    """A finished shard into the record, written at once: the journal an interrupted write resumes from; then,
    writing to a bucket, shipped (a crash between the two leaves the shard here, where the resume keeps it)."""
    record["shards"].append(asdict(shard))
    record.update(summarize_shards(record["shards"]))
    write_set_record(directory, record)
    if shipper is not None:
        shipper.ship(directory / shard.name)


def _stream(
    source: Source,
    writer: ShardWriter,
    policy: ImagePolicy,
    start: int,
    on_error: str,
    workers: int,
    window: int,
    progress: bool,
) -> None:
    """Inputs ``start``.. of ``source``, prepared by ``workers`` processes, into ``writer`` in input order (closed
    on success, aborted on any exception); a bad input raises ``ShardError`` ('stop') or is skipped ('skip')."""
    payloads = (source.payload(position) for position in range(start, len(source)))
    results = ordered_map(prepare_chunk, payloads, workers, window, policy)
    name = Path(writer.pattern).name
    bar = tqdm(
        total=len(source), initial=start, desc=f"writing {name}", unit="img", disable=not progress
    )
    try:
        with writer:
            for position, result in zip(range(start, len(source)), results):
                path = source.paths[position]
                if isinstance(result, str):
                    where = (
                        source.payload(position)
                        if not source.pixels
                        else f"{source.location}: {path}"
                    )
                    if on_error == "stop":
                        raise ShardError(
                            f"{where}: {result} (pass --on_error skip to leave such inputs out; "
                            "finished shards are kept and the same command resumes after them)"
                        )
                    writer.skip(str(where), result)
                else:
                    label = source.labels[position] if source.labels is not None else None
                    writer.add(
                        path_key(path),
                        sample_members(result.data, result.ext, label, path),
                        result.changes,
                    )
                bar.update()
    finally:
        results.close()
        bar.close()


def _complete(
    directory: Path, record: dict, source: Source, trailing_skips: list[tuple[str, str]]
) -> None:
    """Mark the record complete (every input written or skipped) and write ``classes.json`` beside it."""
    record["trailing_skipped"] = trailing_skips
    record.update(summarize_shards(record["shards"]))
    record["skipped"] = source.problems + record["skipped"] + trailing_skips
    record["inputs_done"] += len(trailing_skips)
    record["complete"] = True
    write_classes(directory, source.classes if source.labels is not None else None)
    write_set_record(directory, record)


def _report(
    directory: Path, record: dict, resumed: int, finished_before: bool = False
) -> WriteReport:
    return WriteReport(
        written=record["num_samples"],
        skipped=[tuple(s) for s in record.get("skipped", [])],
        shards=[directory / s["name"] for s in record["shards"]],
        resumed_from=resumed,
        changes=record.get("changes", {}),
        copied=record.get("copied", 0),
        finished_before=finished_before,
    )

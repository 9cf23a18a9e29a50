"""A shard set's labels, classes and source paths wherever the set lives: a local location (a directory, brace
pattern, glob or comma list) or ``s3://bucket/prefix/``. What evaluation reads beside the images (the number of
classes, the label subset for fine-tuning) goes through here, so that every command that takes a local set takes
a bucket too, by the same mechanism as the training stream (``s3.remote_shards`` lists the set; each shard is
fetched whole, ``s3.opened_remote``)."""

from __future__ import annotations

from pathlib import Path

from .s3 import ObjectPath, is_s3, opened_remote, remote_classes, remote_is_labelled, remote_shards
from .shardset import (
    is_labelled,
    opened_local,
    parse_label,
    parse_source_path,
    read_members,
    shard_paths,
)
from .shardset import read_classes as read_local_classes


def set_shards(spec) -> list[Path] | list[ObjectPath]:
    """The shards ``spec`` names: local paths (``shard_paths``), or the objects of an ``s3://`` location (a list
    of them, as a loader's ``.shards`` holds, is taken as it is: already listed)."""
    if not is_s3(spec):
        return shard_paths(spec)
    if isinstance(spec, (list, tuple)):
        return [ObjectPath(s) for s in spec]
    return remote_shards(spec)


def _opened(spec):
    shards = set_shards(spec)
    return opened_remote(shards) if is_s3(shards) else opened_local(shards)


def read_labels(spec) -> dict[str, int]:
    """key -> label of every sample, from the ``.cls`` members (``ShardError`` names a sample without one)."""
    return read_members(_opened(spec), "cls", "label", parse_label)


def read_source_paths(spec) -> dict[str, str]:
    """key -> source path of every sample, from the ``.json`` members."""
    return read_members(_opened(spec), "json", "source path", parse_source_path)


def read_classes(spec) -> list[str] | None:
    """Class names from the ``classes.json`` beside the set's first shard, if present."""
    shards = set_shards(spec)
    first = shards[0]
    return remote_classes(first) if isinstance(first, ObjectPath) else read_local_classes([first])


def labelled(spec) -> bool:
    """Whether the set's samples carry labels (its ``shardset.json``, else a ``classes.json``)."""
    return remote_is_labelled(spec) if is_s3(spec) else is_labelled(shard_paths(spec))


def count_classes(*specs) -> int:
    """The number of classes of labelled sets: the names in ``classes.json`` beside the first set's shards when
    present, else one more than the largest label of any set (for a bucket: every shard fetched once)."""
    names = read_classes(specs[0])
    if names:
        return len(names)
    return 1 + max(max(read_labels(spec).values()) for spec in specs)

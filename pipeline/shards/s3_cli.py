"""``simclr-shards index|verify|write`` on a set in object storage (``s3://bucket/prefix/``).

- ``index`` and ``verify`` fetch one shard at a time into a temporary directory (local disk used: one shard), run
  the local tool on it, upload the new ``.idx`` (index) and remove the copy; names in messages are the object URLs.
- ``write`` runs the local writer into a staging directory (``SIMCLR_SHARDS_STAGING``, default
  ``~/.cache/simclr-shards/``, one folder per output location) and ships each shard as it is finished (its index,
  then the tar, large ones in parts: a shard appears under its key only when complete), removing the local copy:
  local disk used is about two shards, not the set. The set's records go up last. An interrupted write resumes
  when run again with the same arguments: the local writer resumes its journal (``shardset.json``, kept in
  staging until the end), counting a shipped shard as finished when the bucket holds it with its recorded size;
  objects already there with the right size are not sent again. The staging folder is removed at the end.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .s3 import (
    ObjectPath,
    ensure_bucket,
    get_bytes,
    list_objects,
    remote_shards,
    split_url,
    upload_file,
)
from .shardset import ShardError, brace_notation, write_index
from .verify import verify_shard


def _fetch(tar: ObjectPath, directory: Path) -> Path:
    local = directory / tar.name
    local.write_bytes(get_bytes(tar))
    return local


def index_remote(spec: str) -> int:
    """Write (and upload) the ``.idx`` of every tar under ``spec``; tars without one are what this is for."""
    shards = _tars_even_unindexed(spec)
    with tempfile.TemporaryDirectory(prefix="simclr-index-") as directory:
        for tar in shards:
            local = _fetch(tar, Path(directory))
            try:
                index = write_index(local)
            except ShardError as error:
                raise ShardError(str(error).replace(str(local), tar)) from None
            upload_file(index, tar.with_suffix(".idx"))
            local.unlink()
    print(f"indexed {len(shards)} shard(s): {brace_notation(shards)}")
    return 0


def _tars_even_unindexed(spec: str) -> list[ObjectPath]:
    shards = []
    for item in [s for s in str(spec).split(",") if s]:
        bucket, prefix = split_url(item)
        tars = sorted(k for k in list_objects(bucket, prefix) if k.endswith(".tar"))
        if not tars:
            raise ShardError(f"no *.tar shards under s3://{bucket}/{prefix}")
        shards += [ObjectPath(f"s3://{bucket}/{key}") for key in tars]
    return shards


def verify_remote(spec: str, no_labels: bool) -> int:
    """``verify`` over a remote set, one shard on local disk at a time; exit 1 on problems."""
    shards = remote_shards(spec)
    bucket, prefix = split_url(str(spec).split(",")[0])
    require_labels = not no_labels and (prefix.rstrip("/") + "/classes.json").lstrip(
        "/"
    ) in list_objects(bucket, prefix)
    total, problems, first_seen = 0, [], {}
    with tempfile.TemporaryDirectory(prefix="simclr-verify-") as directory:
        for tar in shards:
            local = _fetch(tar, Path(directory))
            (Path(directory) / local.with_suffix(".idx").name).write_bytes(
                get_bytes(tar.with_suffix(".idx"))
            )
            count, found, keys = verify_shard(local, require_labels)
            total += count
            problems += [problem.replace(str(local), tar) for problem in found]
            for key in keys:
                if first_seen.setdefault(key, tar) != tar:
                    problems.append(
                        f"shard {tar} key {key}: the key occurs in shard {first_seen[key]} too"
                    )
            local.unlink()
            local.with_suffix(".idx").unlink()
    for problem in problems:
        print(problem)
    required = "" if require_labels else " (labels not required)"
    print(
        f"verified {total} samples in {len(shards)} shard(s){required}: {len(problems)} problem(s)"
    )
    return 1 if problems else 0


def staging_directory(out: str) -> Path:
    """Where ``write`` stages a set bound for ``out`` (stable across runs: what makes a write resumable)."""
    root = Path(os.environ.get("SIMCLR_SHARDS_STAGING", Path.home() / ".cache" / "simclr-shards"))
    return root / hashlib.sha256(out.rsplit("/", 1)[0].encode()).hexdigest()[:16]


class ShardShipper:
    """Ships each shard to ``s3://bucket/prefix/`` as the local writer finishes it: its ``.idx``, then the tar
    (a reader listing the prefix finds a tar's index first; a large tar goes up in parts and appears only when
    complete), then removes both local files, so that staging holds the shard being written and the one being
    shipped, not the set. An object already there with the same size is not sent again (a rerun)."""

    def __init__(self, bucket: str, prefix: str):
        self.bucket, self.prefix = bucket, prefix
        self.present = list_objects(bucket, prefix)
        self.files = self.uploaded = 0

    def has(self, name: str, size: int) -> bool:
        """Whether shard ``name`` is in the bucket with ``size`` bytes, and its index beside it."""
        key = self.prefix + name
        return self.present.get(key) == size and key.rsplit(".", 1)[0] + ".idx" in self.present

    def send(self, path: Path) -> None:
        key, size = self.prefix + path.name, path.stat().st_size
        self.files += 1
        if self.present.get(key) != size:
            upload_file(path, ObjectPath(f"s3://{self.bucket}/{key}"))
            self.present[key] = size
            self.uploaded += 1

    def ship(self, tar: Path) -> None:
        index = tar.with_suffix(".idx")
        for path in ([index] if index.exists() else []) + [tar]:
            self.send(path)
        for path in (index, tar):
            path.unlink(missing_ok=True)


def write_remote(args, write_local) -> int:
    """``write`` with an ``s3://`` output: the local writer into the staging directory, each shard shipped as it
    is finished (``ShardShipper``), then the set's records and anything a crash left unshipped."""
    out = str(args.out)
    bucket, key_pattern = split_url(out)
    staging = staging_directory(out)
    staging.mkdir(parents=True, exist_ok=True)
    ensure_bucket(bucket)
    prefix = key_pattern.rsplit("/", 1)[0] + "/" if "/" in key_pattern else ""
    args.out = str(staging / key_pattern.rsplit("/", 1)[-1])
    args.shipper = shipper = ShardShipper(bucket, prefix)
    status = write_local(args)
    if status:
        return status
    files = sorted(
        (p for p in staging.iterdir() if p.is_file()), key=lambda p: (p.suffix == ".tar", p.name)
    )
    for path in files:
        shipper.send(path)
    shutil.rmtree(staging)
    print(f"uploaded {shipper.uploaded} of {shipper.files} file(s) to s3://{bucket}/{prefix}")
    return 0

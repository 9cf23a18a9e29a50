"""``simclr-shards index|verify|write`` on a set in object storage (``s3://bucket/prefix/``).

- ``index`` and ``verify`` fetch one shard at a time into a temporary directory (local disk used: one shard), run
  the local tool on it, upload the new ``.idx`` (index) and remove the copy; names in messages are the object URLs.
- ``write`` writes the set to a local staging directory (``SIMCLR_SHARDS_STAGING``, default
  ``~/.cache/simclr-shards/``, one folder per output location) with the local writer, then uploads indexes and
  records, then each shard (large ones in parts: a shard appears under its key only when complete). An interrupted
  write or upload resumes when run again with the same arguments: the local writer resumes its journal and the
  upload skips objects already there with the right size. The staging folder is removed once every object is up,
  so writing needs local disk for the whole set (a limit stated in docs/object_storage.md).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .s3 import ObjectPath, ensure_bucket, get_bytes, list_objects, remote_shards, split_url, upload_file
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
    require_labels = not no_labels and (prefix.rstrip("/") + "/classes.json").lstrip("/") in list_objects(
        bucket, prefix
    )
    total, problems, first_seen = 0, [], {}
    with tempfile.TemporaryDirectory(prefix="simclr-verify-") as directory:
        for tar in shards:
            local = _fetch(tar, Path(directory))
            (Path(directory) / local.with_suffix(".idx").name).write_bytes(get_bytes(tar.with_suffix(".idx")))
            count, found, keys = verify_shard(local, require_labels)
            total += count
            problems += [problem.replace(str(local), tar) for problem in found]
            for key in keys:
                if first_seen.setdefault(key, tar) != tar:
                    problems.append(f"shard {tar} key {key}: the key occurs in shard {first_seen[key]} too")
            local.unlink()
            local.with_suffix(".idx").unlink()
    for problem in problems:
        print(problem)
    required = "" if require_labels else " (labels not required)"
    print(f"verified {total} samples in {len(shards)} shard(s){required}: {len(problems)} problem(s)")
    return 1 if problems else 0


def staging_directory(out: str) -> Path:
    """Where ``write`` stages a set bound for ``out`` (stable across runs: what makes a write resumable)."""
    root = Path(os.environ.get("SIMCLR_SHARDS_STAGING", Path.home() / ".cache" / "simclr-shards"))
    return root / hashlib.sha256(out.rsplit("/", 1)[0].encode()).hexdigest()[:16]


def write_remote(args, write_local) -> int:
    """``write`` with an ``s3://`` output: the local writer into the staging directory, then the upload."""
    out = str(args.out)
    bucket, key_pattern = split_url(out)
    staging = staging_directory(out)
    staging.mkdir(parents=True, exist_ok=True)
    args.out = str(staging / key_pattern.rsplit("/", 1)[-1])
    status = write_local(args)
    if status:
        return status
    ensure_bucket(bucket)
    prefix = key_pattern.rsplit("/", 1)[0] + "/" if "/" in key_pattern else ""
    present = list_objects(bucket, prefix)
    files = sorted((p for p in staging.iterdir() if p.is_file()), key=lambda p: (p.suffix == ".tar", p.name))
    uploaded = 0
    for path in files:
        if present.get(prefix + path.name) != path.stat().st_size:
            upload_file(path, ObjectPath(f"s3://{bucket}/{prefix}{path.name}"))
            uploaded += 1
    shutil.rmtree(staging)
    print(f"uploaded {uploaded} of {len(files)} file(s) to s3://{bucket}/{prefix}")
    return 0

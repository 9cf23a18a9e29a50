"""Shards in S3-compatible object storage (AWS S3, MinIO, Ceph, SeaweedFS, R2, GCS's S3 interface).

A shard location ``s3://bucket/prefix/`` names every ``*.tar`` under the prefix (each with its ``.idx`` beside it),
as a directory names its tars. Credentials, region and endpoint come the standard AWS ways and only those ways:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``~/.aws`` profiles (``AWS_PROFILE``),
``AWS_REGION`` and ``AWS_ENDPOINT_URL`` for a store that is not AWS. No flag or config field carries them, and no
message of ours repeats them: every error names the bucket, the key and what to do (``ObjectStoreError``).

Transient faults (a 503 SlowDown, a 500, a dropped connection, a server restarting) are retried by ``retrying``
with exponential backoff for at most ``RETRY_SECONDS`` in all; faults that retrying cannot fix (wrong credentials,
a missing bucket or key) fail at once.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import TypeVar

from .shardset import CLASSES_FILE, SET_FILE, ShardError, ShardIndex, parse_index

SCHEME = "s3://"
RETRY_SECONDS = float(
    os.environ.get("SIMCLR_S3_RETRY_SECONDS", "120")
)  # transient faults, all attempts together
FIRST_BACKOFF = 0.2  # seconds; doubled per attempt up to MAX_BACKOFF
MAX_BACKOFF = 5.0
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
T = TypeVar("T")


class ObjectStoreError(ShardError):
    """An object-store fault, stated with its bucket, key and remedy (never a credential)."""


def is_s3(spec) -> bool:
    """True for a shard location (or the first of a list of them) in object storage."""
    first = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return isinstance(first, str) and first.startswith(SCHEME)


class ObjectPath(str):
    """``s3://bucket/key``: a str (prints, joins and compares as the URL) with the parts a shard path offers."""

    @property
    def bucket(self) -> str:
        return self[len(SCHEME) :].split("/", 1)[0]

    @property
    def key(self) -> str:
        return self[len(SCHEME) :].split("/", 1)[1] if "/" in self[len(SCHEME) :] else ""

    @property
    def name(self) -> str:
        return self.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0]

    def with_suffix(self, suffix: str) -> ObjectPath:
        return ObjectPath(self.rsplit(".", 1)[0] + suffix)


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix); a clear error for anything else."""
    match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?", str(url))
    if not match:
        raise ObjectStoreError(
            f"{url!r} is not an object location: expected s3://BUCKET/PREFIX/ (bucket: 3-63 of a-z0-9.-)"
        )
    return match.group(1), match.group(2) or ""


# --------------------------------------------------------------------------- the client and its errors


@cache
def client():
    """One boto3 S3 client per process, configured only from the environment / ``~/.aws``. botocore's own
    retries are off: ``retrying`` bounds them by time, which a restarting server needs."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=10, read_timeout=60
    )
    return boto3.session.Session().client("s3", config=config)


def _scrub(text: str) -> str:
    """``text`` without any credential string the environment holds (defence in depth: botocore's messages do not
    carry secrets, but an endpoint URL with user info could)."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name)
        if secret:
            text = text.replace(secret, "***")
    return text


def _is_transient(error: Exception) -> bool:
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(error, (ConnectionError, HTTPClientError)):
        return True
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = error.response.get("Error", {}).get("Code", "")
        return status >= 500 or code in {
            "SlowDown",
            "Throttling",
            "RequestTimeout",
            "InternalError",
        }
    return False


def explain(error: Exception, bucket: str, key: str, action: str) -> ObjectStoreError:
    """``error`` (botocore's) as an ``ObjectStoreError`` naming bucket, key and what to do."""
    from botocore.exceptions import ClientError, NoCredentialsError

    where = f"s3://{bucket}/{key}"
    if isinstance(error, NoCredentialsError):
        return ObjectStoreError(
            f"{action} {where}: no credentials found; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in _CREDENTIAL_CODES or code == "403":
            return ObjectStoreError(
                f"{action} {where}: the store refused the credentials ({code}); check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's permissions"
            )
        if code == "NoSuchBucket":
            return ObjectStoreError(
                f"{action} {where}: bucket {bucket!r} does not exist (check the name and endpoint)"
            )
        if code in _MISSING_CODES:
            return ObjectStoreError(f"{action} {where}: no such object")
        return ObjectStoreError(f"{action} {where}: {code or 'error'}: {_scrub(str(error))}")
    return unavailable(error, bucket, key, action, RETRY_SECONDS)


def unavailable(
    error: Exception, bucket: str, key: str, action: str, seconds: float
) -> ObjectStoreError:
    """The store kept failing transiently (no answer, 5xx, throttling) for ``seconds`` of retries."""
    from botocore.exceptions import ClientError

    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the AWS endpoint")
    what = error.response.get("Error", {}).get("Code", "") if isinstance(error, ClientError) else ""
    return ObjectStoreError(
        f"{action} s3://{bucket}/{key}: the store at {_scrub(endpoint)} did not answer ({what or type(error).__name__})"
        f" within {seconds:g} s of retries; check that it is up (AWS_ENDPOINT_URL)"
    )


def retrying(
    call: Callable[[], T], bucket: str, key: str, action: str, seconds: float | None = None
) -> T:
    """``call()``, retried on transient faults with exponential backoff for at most ``seconds`` (default
    ``RETRY_SECONDS``); any other fault, or the last transient one, raised as an ``ObjectStoreError``."""
    from botocore.exceptions import BotoCoreError, ClientError

    seconds = RETRY_SECONDS if seconds is None else seconds
    deadline = time.monotonic() + seconds
    backoff = FIRST_BACKOFF
    while True:
        try:
            return call()
        except (BotoCoreError, ClientError) as error:
            if not _is_transient(error):
                raise explain(error, bucket, key, action) from None
            if time.monotonic() + backoff > deadline:
                raise unavailable(error, bucket, key, action, seconds) from None
        time.sleep(backoff)
        backoff = min(2 * backoff, MAX_BACKOFF)


# --------------------------------------------------------------------------- reading


def list_objects(bucket: str, prefix: str) -> dict[str, int]:
    """Every object under ``prefix`` -> its size in bytes."""
    found: dict[str, int] = {}

    def pages():
        for page in (
            client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        ):
            for item in page.get("Contents", []):
                found[item["Key"]] = item["Size"]
        return found

    return retrying(pages, bucket, prefix, "listing")


def remote_shards(spec: str) -> list[ObjectPath]:
    """The ``*.tar`` objects a location names: ``s3://bucket/prefix/`` (every tar under it, sorted), or one
    ``s3://bucket/key.tar``, or a comma list of these. Clear errors for a missing bucket, an empty prefix and a
    tar without its ``.idx``."""
    shards: list[ObjectPath] = []
    for item in [s for s in str(spec).split(",") if s]:
        bucket, prefix = split_url(item)
        objects = list_objects(bucket, prefix)
        tars = sorted(
            k
            for k in objects
            if k.endswith(".tar") and (k == prefix or "/" not in k[len(prefix) :])
        )
        if not tars:
            raise ObjectStoreError(
                f"no *.tar shards under s3://{bucket}/{prefix} ({len(objects)} other object(s)); "
                "check the prefix (a folder ends with '/')"
            )
        for key in tars:
            if key[:-4] + ".idx" not in objects:
                raise ObjectStoreError(
                    f"shard s3://{bucket}/{key} has no index s3://{bucket}/{key[:-4]}.idx; index it locally with "
                    "`simclr-shards index` and upload the .idx beside it (or write the set with simclr-shards write)"
                )
            if objects[key] == 0:
                raise ObjectStoreError(f"shard s3://{bucket}/{key} is empty (0 bytes)")
        shards += [ObjectPath(f"s3://{bucket}/{key}") for key in tars]
    return shards


def object_size(path: ObjectPath) -> int:
    head = retrying(
        lambda: client().head_object(Bucket=path.bucket, Key=path.key),
        path.bucket,
        path.key,
        "reading",
    )
    return int(head["ContentLength"])


def get_bytes(path: ObjectPath, seconds: float | None = None) -> bytes:
    """The whole object: one GET, its body read in one go; retried (from the start) on transient faults."""

    def get():
        return client().get_object(Bucket=path.bucket, Key=path.key)["Body"].read()

    return retrying(get, path.bucket, path.key, "reading", seconds)


def read_remote_index(tar: ObjectPath, size: int | None = None) -> ShardIndex:
    """The ``.idx`` beside a remote shard, parsed and checked against the shard's size."""
    idx = tar.with_suffix(".idx")
    text = get_bytes(idx).decode()
    return parse_index(text, tar, idx, size if size is not None else object_size(tar))


def remote_shard_set(spec: str) -> tuple[list[ObjectPath], list[ShardIndex], dict[str, int]]:
    """Shards, their indexes and sizes in bytes for a remote location (one listing, one GET per index)."""
    shards = remote_shards(spec)
    sizes: dict[str, int] = {}
    for bucket in {s.bucket for s in shards}:
        prefixes = os.path.commonprefix([s.key for s in shards if s.bucket == bucket])
        sizes.update({f"s3://{bucket}/{k}": v for k, v in list_objects(bucket, prefixes).items()})
    sizes = {tar: sizes.get(tar) or object_size(tar) for tar in shards}
    return shards, [read_remote_index(tar, sizes[tar]) for tar in shards], sizes


def remote_is_labelled(spec: str) -> bool:
    """``shardset.is_labelled`` for a remote set: its ``shardset.json`` says so; without one, a ``classes.json``
    beside the first shard marks a labelled set."""
    first = remote_shards(spec)[0]
    folder = first.key.rsplit("/", 1)[0] + "/" if "/" in first.key else ""
    beside = list_objects(first.bucket, folder)
    if folder + SET_FILE in beside:
        record = json.loads(
            get_bytes(ObjectPath(f"s3://{first.bucket}/{folder}{SET_FILE}")).decode()
        )
        return bool(record.get("labelled"))
    return folder + CLASSES_FILE in beside


def remote_classes(first: ObjectPath) -> list[str] | None:
    """The class names in the ``classes.json`` beside a remote set's first shard; None without one."""
    folder = first.key.rsplit("/", 1)[0] + "/" if "/" in first.key else ""
    if folder + CLASSES_FILE not in list_objects(first.bucket, folder):
        return None
    return json.loads(
        get_bytes(ObjectPath(f"s3://{first.bucket}/{folder}{CLASSES_FILE}")).decode()
    )["classes"]


def remote_class_count(spec: str) -> int | None:
    """The number of names in the ``classes.json`` beside a remote set's first shard; None without one."""
    names = remote_classes(remote_shards(spec)[0])
    return None if names is None else len(names)


def opened_remote(
    shards: list[ObjectPath],
) -> Iterator[tuple[ObjectPath, ShardIndex, Callable[[int, int], bytes]]]:
    """``shardset.opened_local`` for shards in a bucket: (tar, its index, read(offset, size)), each shard fetched
    whole in one GET as the training stream fetches it (retried, faults named), one shard in memory at a time."""
    for tar in shards:
        data = get_bytes(tar)
        yield (
            tar,
            read_remote_index(tar, len(data)),
            _reader_of(data),
        )


def _reader_of(data: bytes) -> Callable[[int, int], bytes]:
    """``read(offset, size)`` over a fetched shard's bytes."""
    return lambda offset, size: data[offset : offset + size]


# --------------------------------------------------------------------------- writing


def upload_file(local: Path, path: ObjectPath) -> None:
    """Upload ``local`` to ``path``; large files go in parts (boto3's managed transfer), and the object appears
    under its key only when the multipart upload completes: a reader never sees a partial shard."""

    def upload():
        client().upload_file(str(local), path.bucket, path.key)

    from boto3.exceptions import S3UploadFailedError

    try:
        retrying(upload, path.bucket, path.key, "writing")
    except S3UploadFailedError as error:
        raise ObjectStoreError(f"writing {path}: upload failed: {_scrub(str(error))}") from None


def check_shard_location(spec: str) -> None:
    """A config check: a remote location must be well formed (its contents are checked when the loader opens
    it, with the credentials of the run)."""
    if is_s3(spec):
        for item in [s for s in str(spec).split(",") if s]:
            split_url(item)


def upload_set(local: Path, url: str) -> int:
    """Every file of the local shard directory ``local`` (tars, indexes, classes.json, shardset.json) to the
    location ``url`` (``s3://bucket/prefix/``), tars last so that a reader listing the prefix finds each tar's
    ``.idx`` already there; returns the number of files."""
    bucket, prefix = split_url(url)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    files = sorted(
        (p for p in Path(local).iterdir() if p.is_file()),
        key=lambda p: (p.suffix == ".tar", p.name),
    )
    for path in files:
        upload_file(path, ObjectPath(f"s3://{bucket}/{prefix}{path.name}"))
    return len(files)


def ensure_bucket(bucket: str) -> None:
    """Create ``bucket`` if it does not exist (benchmarks and tests on a local server)."""
    from botocore.exceptions import ClientError

    try:
        retrying(lambda: client().head_bucket(Bucket=bucket), bucket, "", "checking")
    except ObjectStoreError:
        try:
            client().create_bucket(Bucket=bucket)
        except ClientError as error:
            raise explain(error, bucket, "", "creating") from None

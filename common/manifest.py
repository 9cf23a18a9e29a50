"""The one integrity gate for directories of weights: a manifest of every file's size and SHA-256, written
last, verified by every reader (resume, ``simclr-export``, ``simclr-evaluate``, ``load_exported``).

A checkpoint (``trainer/checkpoint.py``) keeps its manifest in ``manifest.json``; an export
(``trainer/export.py``) in ``export-manifest.json`` (an export lives beside a run's own files, and a
``manifest.json`` there would make the run directory look like a checkpoint). Both have the same form:
``{"format": ..., "files": {NAME: {"bytes": N, "sha256": HEX}}, ...}``. Readers call ``verify_directory`` (or
``read_verified`` per file as they read it), which raises ``ManifestError`` naming the damaged file. This
module is in ``common`` so that evaluation can verify checkpoints without importing the trainer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CHECKPOINT_MANIFEST = "manifest.json"
EXPORT_MANIFEST = "export-manifest.json"


class ManifestError(ValueError):
    """A directory does not match its manifest (or has none that can be read); the message names the file."""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entry(data: bytes) -> dict:
    """A manifest's entry for a file holding ``data``."""
    return {"bytes": len(data), "sha256": digest(data)}


def read_manifest(
    directory: Path, name: str = CHECKPOINT_MANIFEST, formats: tuple[str, ...] = ()
) -> dict:
    """The manifest ``directory/name``, checked for form (a JSON object whose ``format`` is one of ``formats``
    and whose ``files`` is an object); the files themselves are checked by ``read_verified``."""
    path = Path(directory) / name
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(
            f"{directory} has no {name} (not a directory this project wrote, or one never completed)"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ManifestError(f"{path} cannot be read ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{path} is not a manifest (a JSON object with a 'files' object)")
    if formats and manifest.get("format") not in formats:
        raise ManifestError(
            f"{path} is not a {' or '.join(formats)} manifest (format {manifest.get('format')!r})"
        )
    return manifest


def read_verified(
    directory: Path, name: str, manifest: dict, manifest_name: str = CHECKPOINT_MANIFEST
) -> bytes:
    """The bytes of ``directory/name`` after checking them against the manifest's size and SHA-256."""
    directory = Path(directory)
    expected = manifest["files"].get(name)
    if not isinstance(expected, dict):
        raise ManifestError(f"{directory / manifest_name} does not list {name}")
    try:
        data = (directory / name).read_bytes()
    except OSError as error:
        raise ManifestError(
            f"{directory / name} cannot be read ({error.strerror or error})"
        ) from None
    if len(data) != expected.get("bytes"):
        raise ManifestError(
            f"{directory / name} has {len(data)} bytes, its manifest says {expected.get('bytes')} "
            "(truncated or rewritten)"
        )
    if digest(data) != expected.get("sha256"):
        raise ManifestError(
            f"{directory / name} does not match the SHA-256 in its manifest (damaged)"
        )
    return data


def verify_directory(
    directory: Path,
    name: str = CHECKPOINT_MANIFEST,
    formats: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
) -> dict:
    """The manifest of ``directory`` once every file it lists (and every one of ``required``) has its size and
    SHA-256; else ``ManifestError`` naming the first file at fault."""
    manifest = read_manifest(directory, name, formats)
    missing = [file for file in required if file not in manifest["files"]]
    if missing:
        raise ManifestError(f"{Path(directory) / name} does not list {', '.join(missing)}")
    for file in manifest["files"]:
        read_verified(directory, file, manifest, name)
    return manifest


def verify_file(path: Path) -> bool:
    """Check one weights file against the manifest beside it that lists it (a checkpoint's or an export's):
    True if verified, False if no manifest there lists it (nothing to check against); ``ManifestError`` if
    it does not match."""
    path = Path(path)
    for name in (CHECKPOINT_MANIFEST, EXPORT_MANIFEST):
        if (path.parent / name).is_file():
            manifest = read_manifest(path.parent, name)
            if path.name in manifest["files"]:
                read_verified(path.parent, path.name, manifest, name)
                return True
    return False

"""Files that survive crashes: written beside their final name, flushed to disk, then renamed into place.

A reader (a resuming run, DALI, another process) sees the old file or the complete new one, never a
partial one: the data is fsynced before the rename and the directory after it, so a node crash cannot
leave a renamed file whose blocks never reached the disk.

Temporaries are created with the modes a plain ``open`` / ``mkdir`` gives (0666 / 0777 less the umask, and a
directory's default ACL), not ``tempfile``'s private 0600 / 0700: the renamed file is what other users of a
shared filesystem read."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_directory(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX needs the directory itself synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique_names(directory: Path, prefix: str, suffix: str) -> Iterator[Path]:
    for _ in range(100):
        yield directory / f"{prefix}{secrets.token_hex(6)}{suffix}"
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {directory}")


def create_temporary_file(directory: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> Path:
    """A new empty file with a unique name in ``directory``, with the mode ``open`` would give it."""
    for path in _unique_names(Path(directory), prefix, suffix):
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
            return path
        except FileExistsError:
            continue


def create_temporary_directory(directory: str | os.PathLike, prefix: str) -> Path:
    """A new empty directory with a unique name in ``directory``, with the mode ``mkdir`` would give it."""
    for path in _unique_names(Path(directory), prefix, ""):
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue


def give_open_mode(path: str | os.PathLike) -> None:
    """Give a file another writer made (safetensors' ``save_file`` makes 0600 files) the mode ``open`` gives."""
    probe = create_temporary_file(Path(path).parent, prefix=".mode-")
    try:
        os.chmod(path, probe.stat().st_mode & 0o777)
    finally:
        probe.unlink()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write to; on success it is fsynced and renamed onto
    ``target``; on an exception it is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = create_temporary_file(target.parent, prefix=f".{target.name}.")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_directory(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to the disk (a file written by someone else, e.g. a library given a path)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_durable(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it before returning (the caller renames it into place later)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def replace_directory(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename the complete, fsynced directory ``staging`` onto ``target`` and make the rename durable.

    An existing ``target`` is first renamed to ``.replaced-NAME-*`` beside it and removed once the new one is
    in place; ``restore_replaced`` puts such a copy back if a crash came between the two renames."""
    staging, target = Path(staging), Path(target)
    replaced = None
    if target.exists():
        replaced = create_temporary_directory(target.parent, prefix=f".replaced-{target.name}-")
        os.rename(target, replaced / target.name)
    os.rename(staging, target)
    fsync_directory(target.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return target


def restore_replaced(directory: str | os.PathLike) -> list[Path]:
    """After a crash inside ``replace_directory``: put back each replaced directory whose new copy never
    arrived, drop the others. Returns the directories restored."""
    restored = []
    for holder in Path(directory).glob(".replaced-*"):
        for old in holder.iterdir():
            if not (holder.parent / old.name).exists():
                os.rename(old, holder.parent / old.name)
                restored.append(holder.parent / old.name)
        shutil.rmtree(holder, ignore_errors=True)
    if restored:
        fsync_directory(directory)
    return restored


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(target, text.encode())


def check_writable(directory: str | os.PathLike, what: str = "output directory") -> Path:
    """Create ``directory`` if needed and prove it writable by writing and removing a file in it; raises
    ``OSError`` naming the directory (before any work whose results would have nowhere to go)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as error:
        raise OSError(f"{what} {directory} is not writable ({error.strerror or error})") from None
    return directory


class WriteFailure(OSError):
    """A result file (an export, a report, a summary) cannot be written; ``str()`` names the path and why."""


def write_result(target: str | os.PathLike, data: bytes | str, what: str = "result") -> Path:
    """``atomic_write_bytes`` for the files a command produces, the one error path for all of them: any
    ``OSError`` (a full disk, permissions) becomes a ``WriteFailure`` naming ``what`` and ``target``, which
    the commands turn into exit status 1 (the target keeps its previous content: the write is atomic)."""
    try:
        return atomic_write_bytes(target, data.encode() if isinstance(data, str) else data)
    except OSError as error:
        raise WriteFailure(
            error.errno, f"cannot write the {what} {target}: {error.strerror or error}"
        ) from None

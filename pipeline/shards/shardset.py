"""The shard set on disk, read side: WebDataset tars, their DALI indexes, class names and the set's record.

Shard names, sample keys, indexes, labels and source paths, so that every reader (loader, verify, evaluation
subsets) agrees on one format: each sample is a ``.jpg`` (or ``.png``), an optional ``.cls`` label and a ``.json``
with its source path, under a key escaped from that path (injective, stable, reversed by ``key_path``); each tar
has DALI's ``.idx`` beside it, and the set a ``classes.json`` and a ``shardset.json``. Writing lives in
``pipeline.shards.writer``, checking in ``pipeline.shards.verify``. The format in full: docs/data.md.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import struct
import tarfile
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import braceexpand
from tqdm import tqdm

from ...common.errors import SimclrError
from ...common.files import atomic_write_text

# The members a sample's image may be stored as (what DALI's decoder and the verifier read).
IMAGE_COMPONENTS = ("jpg", "jpeg", "png", "webp")
INDEX_VERSION = "v1.2"
SET_FILE = "shardset.json"
CLASSES_FILE = "classes.json"
SET_FORMAT = 1
# The most pixels an image may have: PIL's DecompressionBombError threshold (2 x Image.MAX_IMAGE_PIXELS), which
# ``write`` and ``verify`` apply when they open an image; the loader applies the same cap before DALI decodes.
MAX_IMAGE_PIXELS = 178_956_970
HEADER_READ = (
    4096  # bytes of an image read to find its size; more only when its header is longer (EXIF)
)


class ShardError(SimclrError, ValueError):
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
            raise ShardError(
                f"output pattern {out!r} has {len(braces)} brace ranges: give exactly one shard number"
            )
        if _PRINTF_NUMBER.search(out):
            raise ShardError(
                f"output pattern {out!r} mixes a brace range and a % conversion: give one shard number"
            )
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
        raise ShardError(
            f"output pattern {out!r} puts its shard number in a directory name: number the file name"
        )
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
        "".join(
            chr(b) if b in _KEY_SAFE else f"%{b:02X}"
            for b in part.encode("utf-8", "surrogateescape")
        )
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
            f"sample key {key!r} is not a valid key: use pipeline.shards.shardset.path_key "
            "(letters, digits, _ - / and %XX escapes)"
        )
    return key


def unsafe_member_name(name: str) -> str | None:
    """Why a tar member name is unsafe (an absolute path, a '..' part: a tool that unpacks the shard would
    write outside its folder), or None."""
    if name.startswith("/"):
        return "an absolute path"
    if ".." in name.split("/"):
        return "a '..' part"
    return None


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
        raise ShardError(
            f"shard {tar} is not a readable tar ({error}); it may be truncated or corrupt"
        ) from None
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
        tar,
        [
            {ext: (offset, size, name) for ext, offset, size, name in sample}
            for sample in build_index(tar)
        ],
    ).text()


def write_index(tar: Path) -> Path:
    """Write DALI's index beside ``tar``; atomic and fsynced (common.files)."""
    return atomic_write_text(index_path(tar), index_text(tar))


def index_shards(shards: list[Path], progress: bool = True) -> None:
    """Write DALI's index beside each of ``shards``."""
    for tar in tqdm(shards, desc="indexing", unit="shard", disable=not progress or len(shards) < 2):
        write_index(tar)


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
            " ".join(
                f"{ext} {offset} {size} {name}" for ext, (offset, size, name) in sample.items()
            )
            for sample in self.samples
        ]
        return "\n".join(lines) + "\n"


def read_index(tar: Path) -> ShardIndex:
    """Parse and sanity-check ``tar``'s index (exists, well formed, consistent with the tar's size)."""
    idx = index_path(tar)
    if not idx.exists():
        raise ShardError(
            f"shard {tar} has no index {idx}; create it with: simclr-shards index {tar}"
        )
    return parse_index(idx.read_text(), tar, idx, tar.stat().st_size)


def parse_index(text: str, tar, idx, size: int) -> ShardIndex:
    """The index ``text`` of ``tar`` (read from ``idx``; the tar has ``size`` bytes), checked: well formed and
    within the tar. Shared by local shards and shards in object storage (``pipeline.shards.s3``)."""
    lines = text.splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ShardError(
            f"index {idx} has a bad header {lines[:1]}; rebuild it with: simclr-shards index {tar}"
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
            {
                fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                for i in range(0, len(fields), 4)
            }
        )
    end = max(offset + length for sample in samples for offset, length, _ in sample.values())
    if end > size:
        raise ShardError(
            f"shard {tar} is truncated: its index reaches byte {end} but the file has {size} bytes"
        )
    return ShardIndex(tar, samples)


TAR_BLOCK = 512
INDEX_SAMPLED_MEMBERS = (
    16  # members whose tar headers are compared with the index, besides the end marker
)


def _header_member(header: bytes) -> tuple[str, int] | None:
    """(name, size) of a regular file's 512-byte ustar/GNU header, None if it is not one (a bad checksum, another
    type). A name over 100 bytes is cut short there (its full form is in a preceding GNU/pax record)."""
    if len(header) < TAR_BLOCK or header[156:157] not in (b"0", b"\0"):
        return None
    try:
        checksum = int(header[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
        size = int(header[124:136].replace(b"\0", b" ").strip() or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(header[:148]) + 8 * 32 + sum(header[156:TAR_BLOCK]):
        return None
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape"), size


def _members_to_check(index: ShardIndex, count: int) -> list[tuple[int, int, str]]:
    members = [member for sample in index.samples for member in sample.values()]
    if len(members) <= count:
        return members
    return [members[round(i * (len(members) - 1) / (count - 1))] for i in range(count)]


@contextmanager
def _shard_bytes(index: ShardIndex, handle: BinaryIO | None) -> Iterator[BinaryIO]:
    """``handle`` (a shard's bytes already at hand, e.g. fetched from object storage), else the local tar opened."""
    if handle is not None:
        yield handle
        return
    with open(index.tar, "rb") as opened:
        yield opened


def check_index_matches(
    index: ShardIndex, sampled: int = INDEX_SAMPLED_MEMBERS, handle: BinaryIO | None = None
) -> ShardIndex:
    """``index`` if it still describes its tar, checked cheaply (``sampled`` 512-byte header reads and one of
    1 KiB, whatever the shard's size): the tar header before each of ``sampled`` members spread over the index
    (first and last included) names that member with that size, and the end-of-archive marker follows the
    last indexed member (an index of a shorter tar, or of an older version of this one, fails here). Else
    ``ShardError`` naming the shard and the ``simclr-shards index`` command: DALI reading a stale index
    would decode garbage, or abort the process in nvImageCodec. (``simclr-shards verify`` compares every
    member.) The tar is read from ``handle`` when given (a shard fetched from object storage), else opened."""
    tar, idx = index.tar, index_path(index.tar)
    rebuild = (
        f"the tar changed after its index was built; rebuild it with: simclr-shards index {tar}"
    )
    with _shard_bytes(index, handle) as handle:
        for offset, size, name in _members_to_check(index, sampled):
            found = None
            if offset >= TAR_BLOCK:
                handle.seek(offset - TAR_BLOCK)
                found = _header_member(handle.read(TAR_BLOCK))
            if found is None or found[1] != size or not _same_member_name(found[0], name):
                seen = f"{found[0]!r} of {found[1]} bytes" if found else "no tar header of a file"
                raise ShardError(
                    f"shard {tar}: its index {idx} does not match the tar (it lists {name!r} of {size} bytes at "
                    f"byte {offset}, the tar has {seen} there); {rebuild}"
                )
        end = max(offset + size for sample in index.samples for offset, size, _ in sample.values())
        handle.seek(-(-end // TAR_BLOCK) * TAR_BLOCK)
        marker = handle.read(2 * TAR_BLOCK)
    if len(marker) < 2 * TAR_BLOCK or marker.count(0) != 2 * TAR_BLOCK:
        raise ShardError(
            f"shard {tar}: its index {idx} does not match the tar (the tar holds more members after the last "
            f"one the index lists, at byte {end}); {rebuild}"
        )
    return index


def _same_member_name(in_header: str, in_index: str) -> bool:
    if in_header == in_index:
        return True
    # a long name: the header holds a cut-down form (GNU: its first 100 bytes; pax: a shortened path)
    return (
        len(in_index.encode("utf-8", "surrogateescape")) > 99
        and bool(in_header)
        and in_index.startswith(in_header[:50])
    )


_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {
    0xC4,
    0xC8,
    0xCC,
}  # SOF0..SOF15: the markers that give the size
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def jpeg_frame(data: bytes) -> tuple[int, int] | str | None:
    """(marker, position) of a JPEG stream's start-of-frame marker (SOF0..SOF15); None when the scan starts
    first or the bytes are no marker stream, "more" when ``data`` ends inside the header. The one marker walk:
    the size here, the frame type in ``image_policy.jpeg_frame_type``."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif (
            marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7
        ):  # standalone markers: no length field
            position += 2
        elif marker in _JPEG_FRAMES:
            return marker, position
        elif marker == 0xDA:  # start of scan: no frame header came first
            return None
        else:
            position += 2 + struct.unpack(">H", data[position + 2 : position + 4])[0]
    return "more"


def _header_dimensions(data: bytes) -> tuple[int, int] | str | None:
    """(width, height) from a JPEG's frame header or a PNG's IHDR, "more" when a JPEG's header goes on past
    ``data``, None for other formats (PIL reads those)."""
    if data[:8] == _PNG_SIGNATURE and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] != b"\xff\xd8":
        return None
    frame = jpeg_frame(data)
    if not isinstance(frame, tuple):
        return frame
    position = frame[1]
    if position + 9 > len(data):
        return "more"
    height, width = struct.unpack(">HH", data[position + 5 : position + 9])
    return width, height


def image_size(handle, offset: int, size: int) -> tuple[int, int] | None:
    """(width, height) of the image stored at ``offset`` (``size`` bytes) of an open shard, from its header
    (4 KiB read first, all of it only when the header is longer, e.g. a large EXIF block); None when no header
    can be parsed (the decode check names such images). JPEG and PNG by hand (~10x faster than PIL), other
    formats through PIL."""
    read = min(size, HEADER_READ)
    while True:
        handle.seek(offset)
        data = handle.read(read)
        found = _header_dimensions(data)
        if found == "more" and read < size:
            read = size
            continue
        if isinstance(found, tuple):
            return found
        return _pil_dimensions(data)


def _pil_dimensions(data: bytes) -> tuple[int, int] | None:
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's own bomb warning: the caller applies the cap
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(io.BytesIO(data)).size
        except (OSError, SyntaxError, ValueError):
            return None
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def check_pixel_cap(
    index: ShardIndex, max_pixels: int = MAX_IMAGE_PIXELS, handle: BinaryIO | None = None
) -> ShardIndex:
    """``index`` if no image in its shard has more than ``max_pixels`` pixels (read from each image's header,
    before any decoder sees it); else ``ShardError`` naming the shard, the key, the size and the cap: a
    decompression bomb (a 20000 x 20000 JPEG of a few MB) would cost every epoch a 1.2 GB decode. The tar is
    read from ``handle`` when given (a shard fetched from object storage), else opened."""
    with _shard_bytes(index, handle) as handle:
        for sample in index.samples:
            for ext, (offset, size, name) in sample.items():
                if ext.lower() not in IMAGE_COMPONENTS:
                    continue
                found = image_size(handle, offset, size)
                if found is not None and found[0] * found[1] > max_pixels:
                    raise ShardError(
                        f"shard {index.tar} key {sample_key(name)}: a {found[0]} x {found[1]} image "
                        f"({found[0] * found[1]:,} pixels) is over the pixel cap of {max_pixels:,} "
                        "(max_image_pixels; simclr-shards write and verify apply the same cap): remove it or "
                        "rewrite the set with --max_side"
                    )
    return index


def read_checked_index(tar: Path) -> ShardIndex:
    """``read_index`` + ``check_index_matches``: what every reader that seeks by the index uses."""
    return check_index_matches(read_index(tar))


def check_shard(
    index: ShardIndex, max_pixels: int = MAX_IMAGE_PIXELS, handle: BinaryIO | None = None
) -> ShardIndex:
    """Everything the loader checks of a shard before DALI sees any of it: its index matches the tar
    (``check_index_matches``) and no image is over the pixel cap (``check_pixel_cap``). One gate for both
    kinds of shard: a local tar is opened here (at loader start); a shard in object storage is checked on its
    fetched bytes (``handle``), before its samples are cut out (``pipeline.remote``)."""
    return check_pixel_cap(check_index_matches(index, handle=handle), max_pixels, handle)


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
            raise ValueError(
                f"unknown format {record.get('format') if isinstance(record, dict) else record!r}"
            )
        return record
    except (OSError, ValueError) as error:
        raise ShardError(
            f"{path} is not a shard-set record written by pipeline.shards.cli ({error})"
        ) from None


def is_labelled(shards: list[Path]) -> bool:
    """Whether a set's samples must carry labels: its ``shardset.json`` says so; without one (older or
    third-party sets), a ``classes.json`` beside the shards marks a labelled set."""
    record = read_set_record(shards[0].parent)
    if record is not None:
        return bool(record["labelled"])
    return (shards[0].parent / CLASSES_FILE).exists()


def opened_local(shards) -> Iterator[tuple[Path, ShardIndex, Callable[[int, int], bytes]]]:
    """(tar, its checked index, read(offset, size)) for every local shard ``shards`` names, one open at a time."""
    for tar in shard_paths(shards):
        index = read_checked_index(tar)
        with open(tar, "rb") as handle:

            def read(offset: int, size: int, handle=handle) -> bytes:
                handle.seek(offset)
                return handle.read(size)

            yield tar, index, read


Value = TypeVar("Value")


def read_members(
    opened, ext: str, what: str, decode: Callable[[str, Path, str], Value]
) -> dict[str, Value]:
    """key -> decode(text, tar, key) of member ``ext`` of every sample of the ``opened`` shards ((tar, index,
    read) triples: ``opened_local``, or ``s3.opened_remote`` for a bucket), read through the indexes.
    ``ShardError`` names a sample without it and a key that occurs twice."""
    values: dict[str, Value] = {}
    for tar, index, read in opened:
        for sample in index.samples:
            key = sample_key(next(iter(sample.values()))[2])
            if ext not in sample:
                raise ShardError(
                    f"shard {tar}: sample key {key} has no {what} (.{ext}); {MISSING_MEMBER_HINT[ext]}"
                )
            offset, size, _ = sample[ext]
            value = decode(read(offset, size).decode("utf-8", errors="replace"), tar, key)
            if key in values:
                raise ShardError(
                    f"shard {tar}: key {key} occurs twice in the shard set; samples are looked up by key"
                )
            values[key] = value
    return values


def _read_member(
    shards, ext: str, what: str, decode: Callable[[str, Path, str], object]
) -> dict[str, object]:
    """``read_members`` of local shards (a few bytes per sample, no image read)."""
    return read_members(opened_local(shards), ext, what, decode)


MISSING_MEMBER_HINT = {
    "cls": "this needs labelled shards",
    "json": "the shards were written without source paths: rewrite them with `simclr-shards write`",
}


def parse_label(text: str, tar: Path, key: str) -> int:
    """A sample's ``.cls`` text as its label (``ShardError`` naming shard and key if it is not one)."""
    text = text.strip()
    if not text.isdigit():
        raise ShardError(f"shard {tar} key {key}: label {text!r} is not a non-negative integer")
    return int(text)


def parse_source_path(text: str, tar: Path, key: str) -> str:
    """The source path a sample's ``.json`` member holds (``ShardError`` naming shard and key if none)."""
    try:
        return str(json.loads(text)["path"])
    except (ValueError, KeyError, TypeError):
        raise ShardError(
            f"shard {tar} key {key}: its .json member holds no source path ({text[:80]!r})"
        ) from None


def read_labels(shards) -> dict[str, int]:
    """key -> label of every sample, from the ``.cls`` members (``ShardError`` names a sample without one)."""
    return _read_member(shards, "cls", "label", parse_label)


def read_source_paths(shards) -> dict[str, str]:
    """key -> source path of every sample, from the ``.json`` members."""
    return _read_member(shards, "json", "source path", parse_source_path)

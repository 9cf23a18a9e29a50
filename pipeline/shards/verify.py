"""Checking a shard set: every sample's image decodes (in a format DALI reads), labels and source paths parse,
indexes match their tars, no key occurs twice; and what the set's record says about how it was written.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ...common.processes import process_pool
from .shardset import (
    CLASSES_FILE,
    IMAGE_COMPONENTS,
    SET_FILE,
    ShardError,
    build_index,
    index_path,
    parse_source_path,
    read_index,
    read_set_record,
    sample_key,
    unsafe_member_name,
)

# Image formats DALI's decoders read (GIF is not one of them).
DALI_FORMATS = {"JPEG", "PNG", "WEBP", "TIFF", "BMP", "PPM", "JPEG2000"}


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
        return (
            False,
            "not a decodable image (unknown format, or truncated before the image header ends)",
        )
    except Exception as error:  # PIL raises OSError/SyntaxError/ValueError... for bad data
        text = str(error)
        if "truncated" in text.lower():
            return False, f"truncated image data ({text})"
        return False, f"corrupt image ({type(error).__name__}: {text})"
    if image_format not in DALI_FORMATS:
        return (
            False,
            f"{image_format} data, which DALI's decoder cannot read; rewrite the set with `simclr-shards write`",
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
            problems.append(
                f"shard {tar}: index {index_path(tar)} does not match the tar; rebuild it with `index`"
            )
    except ShardError as error:
        problems.append(str(error))
    keys = []
    for sample in actual:
        for _, _, _, name in sample:
            if unsafe := unsafe_member_name(name):
                problems.append(
                    f"shard {tar}: member {name!r} has {unsafe} (tools that unpack the tar would write outside "
                    "its folder); rewrite the set with `simclr-shards write`"
                )
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
                    problems.append(
                        f"shard {tar} key {key}: label {text!r} is not a non-negative integer"
                    )
            elif require_labels:
                problems.append(f"shard {tar} key {key}: no label (.cls) component")
            if "json" in parts:
                handle.seek(parts["json"][0])
                try:
                    parse_source_path(
                        handle.read(parts["json"][1]).decode("utf-8", "replace"), tar, key
                    )
                except ShardError as error:
                    problems.append(str(error))
    return len(actual), problems, keys


def verify_shards(
    shards: list[Path],
    require_labels: bool = True,
    progress: bool = True,
    workers: int | None = None,
) -> tuple[int, list[str]]:
    """(samples, problems) over ``shards``, checked in ``workers`` processes; a key in two shards is a problem."""
    if workers is not None and workers < 1:
        raise ShardError(f"--workers must be >= 1, got {workers}")
    total, problems, first_seen = 0, [], {}
    with process_pool(min(workers or os.cpu_count(), max(1, len(shards)))) as pool:
        results = pool.map(verify_shard, shards, [require_labels] * len(shards))
        for tar, (count, found, keys) in tqdm(
            zip(shards, results),
            total=len(shards),
            desc="verifying",
            unit="shard",
            disable=not progress,
        ):
            total += count
            problems += found
            for key in keys:
                if first_seen.setdefault(key, tar) != tar:
                    problems.append(
                        f"shard {tar} key {key}: the key occurs in shard {first_seen[key]} too"
                    )
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
    labelled = (
        f"labelled ({record.get('num_classes')} classes)" if record["labelled"] else "unlabelled"
    )
    lines = [
        f"set: {record.get('num_samples', 0)} samples from {source.get('kind')} {source.get('location', '')}".rstrip()
        + f", {labelled}"
    ]
    if "quality" in settings:
        encoding = (
            "PNG"
            if settings.get("pixel_format") == "png" and source.get("kind") in PIXEL_SOURCES
            else "JPEG"
        )
        changes = ", ".join(
            f"{reason} {count}" for reason, count in record.get("changes", {}).items()
        )
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
        lines.append(
            f"skipped at write time: {len(record['skipped'])} input(s), listed in {directory / SET_FILE}"
        )
    if not record.get("complete"):
        lines.append(
            f"problem: the write of this set did not finish ({record.get('inputs_done', 0)} of "
            f"{source.get('inputs', '?')} inputs); rerun the same `write` command to resume it"
        )
    missing = [r["name"] for r in record.get("shards", []) if not (directory / r["name"]).exists()]
    if missing:
        lines.append(
            f"problem: {len(missing)} shard(s) listed in {SET_FILE} are missing, e.g. {missing[:3]}"
        )
    return lines


PIXEL_SOURCES = ("cifar", "arrays", "synthetic")
SUBSAMPLING_WORDS = {
    "auto": "as each source JPEG, 4:4:4 for other formats",
    "444": "4:4:4",
    "422": "4:2:2",
    "420": "4:2:0",
}

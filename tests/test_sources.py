"""The shard writer as data really comes: unlabelled trees, list files, every image format PIL opens, keys
from source paths, resumable and failure-safe writes, a bounded window, official subset lists, and the
shard CLI's bad inputs (one line, exit status 2)."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib

import numpy as np
import pytest
import webdataset as wds
from conftest import ROOT, SHARED_DATA, random_images
from PIL import Image, ImageOps

import simclr_dali.pipeline.shards.pixel_sources as pixel_sources
import simclr_dali.pipeline.shards.shardset as shardset
import simclr_dali.pipeline.shards.source_writer as source_writer
import simclr_dali.pipeline.shards.writer as shardwriter
from simclr_dali.evaluation.subset import SubsetError, subset_for
from simclr_dali.pipeline.augment import AugmentConfig
from simclr_dali.pipeline.loader import (
    AugmentedView,
    DaliLoader,
    EvalView,
    TwoViews,
    classifier_augment,
)
from simclr_dali.pipeline.shards.cli import main
from simclr_dali.pipeline.shards.image_policy import (
    ImagePolicy,
    jpeg_frame_type,
    prepare_chunk,
    prepare_file,
)
from simclr_dali.pipeline.shards.shardset import (
    ShardError,
    check_key,
    key_path,
    output_pattern,
    path_key,
    read_index,
    read_source_paths,
    sample_key,
    shard_paths,
)
from simclr_dali.pipeline.shards.source_writer import ordered_map, write_source
from simclr_dali.pipeline.shards.sources import folder_source, images_source, list_source
from simclr_dali.pipeline.shards.verify import describe_set, verify_shard


def stored_samples(directory) -> list[dict]:
    """Every sample's members, read with the webdataset library (a third-party reader), in shard order."""
    shards = [str(p) for p in sorted(directory.glob("*.tar"))]
    return list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))


def save(image: Image.Image, path, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


# --------------------------------------------------------------------------- keys


STRANGE_PATHS = [
    "plain.jpg",
    "two.dots.in.name.JPEG",
    "with space/and more spaces.png",
    "ünïcödé/日本語.jpg",
    "emoji 🐈.webp",
    "percent%41.jpg",
    "percent%.jpg",
    "-dash_under.tif",
    "semi;colon,comma+plus=eq&amp#hash.bmp",
    "a/b/c/d/e.gif",
    "tab\there.jpg",
    "quote'\"s.jpg",
    "back\\slash.jpg",
    ".hidden-looking/x.jpg",
    "x/.y",
    "no_extension",
    "UPPER/lower/MiXeD.JpEg",
    "n01440764/n01440764_10026.JPEG",
]


def test_key_escaping_rule_is_reversible_injective_and_safe():
    keys = [path_key(path) for path in STRANGE_PATHS]
    assert len(set(keys)) == len(keys)  # distinct paths, distinct keys
    for path, key in zip(STRANGE_PATHS, keys):
        assert check_key(key) == key
        assert key_path(key) == path
        assert not any(ch in key for ch in ". \t\n\"'\\") and key.isascii()
        assert (
            sample_key(f"{key}.jpg") == key and sample_key(f"{key}.json") == key
        )  # WebDataset's cut at the first dot
    assert path_key("n01440764/n01440764_10026.JPEG") == "n01440764/n01440764_10026%2EJPEG"
    assert path_key("my photos/é.png") == "my%20photos/%C3%A9%2Epng"
    assert path_key("percent%41.jpg") != path_key("percentA.jpg")  # '%' itself is escaped
    for bad in ("", "/abs.jpg", "../up.jpg", "a/../b.jpg"):
        with pytest.raises(ShardError):
            path_key(bad)
    for bad in ("has.dot", "has space", "%zz", "%4a", "a//b", "/a", "a/", "é"):
        with pytest.raises(ShardError):
            check_key(bad)


@pytest.mark.slow
def test_strange_names_round_trip_through_tar_index_dali_and_webdataset(tmp_path):
    visible = [
        path for path in STRANGE_PATHS if not any(part.startswith(".") for part in path.split("/"))
    ]  # hidden: not read
    images = random_images(len(visible), 16, seed=2)
    root = tmp_path / "src"
    for path, image in zip(visible, images):
        save(Image.fromarray(image), root / (path if "." in path else path + ".jpg"), format="JPEG")
    save(Image.fromarray(images[0]), root / ".hidden-looking" / "x.jpg", format="JPEG")
    report = write_source(
        images_source(root), str(tmp_path / "out" / "k-%06d.tar"), max_count=7, progress=False
    )
    assert report.written == len(visible) and not report.skipped
    paths = read_source_paths(shard_paths(tmp_path / "out"))  # through the DALI indexes
    assert all(path_key(path) == key for key, path in paths.items())
    on_disk = {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and ".hidden" not in str(p)
    }
    assert set(paths.values()) == on_disk
    assert {s["__key__"] for s in stored_samples(tmp_path / "out")} == set(paths)
    loader = DaliLoader(
        tmp_path / "out", 4, TwoViews(AugmentConfig.cifar(16)), train=False, num_threads=1
    )
    assert sum(view1.shape[0] for view1, _ in loader) == len(visible)


# --------------------------------------------------------------------------- sources and formats


def nested_unlabelled_tree(root, count=13):
    images = random_images(count, 24, seed=5)
    paths = []
    for i, image in enumerate(images):
        relative = ["top", "2024 trip/day 1", "2024 trip/day 2/ëxtra", "deep/a/b/c"][
            i % 4
        ] + f"/IMG {i:03d}.v1.jpg"
        save(Image.fromarray(image), root / relative, format="JPEG", quality=92)
        paths.append(relative)
    return paths


def test_unlabelled_nested_folder_round_trip(tmp_path, capsys):
    paths = nested_unlabelled_tree(tmp_path / "photos")
    out = tmp_path / "out"
    assert (
        main(
            [
                "write",
                "images",
                str(tmp_path / "photos"),
                str(out / "u-%06d.tar"),
                "--quiet",
                "--workers",
                "1",
                "--max_count",
                "5",
            ]
        )
        == 0
    )
    samples = stored_samples(out)
    assert len(samples) == len(paths) and all("cls" not in s for s in samples)
    stored = {json.loads(s["json"])["path"]: s for s in samples}
    assert set(stored) == set(paths)
    for path, sample in stored.items():
        assert sample["__key__"] == path_key(path)
        assert (
            sample["jpg"] == (tmp_path / "photos" / path).read_bytes()
        )  # baseline JPEGs: byte-identical
    assert (
        not (out / "classes.json").exists()
        and json.loads((out / "shardset.json").read_text())["labelled"] is False
    )
    capsys.readouterr()
    assert (
        main(["verify", str(out), "--workers", "1", "--quiet"]) == 0
    )  # labels not required: the set says unlabelled
    assert "unlabelled" in capsys.readouterr().out
    views = DaliLoader(
        out, 4, TwoViews(AugmentConfig.cifar(24)), train=True, num_threads=1
    )  # pretraining reads it
    assert len(views) == len(paths) // 4
    with pytest.raises(
        ShardError, match="needs labelled shards"
    ):  # what the in-training probe and evaluate.py build
        DaliLoader(out, 4, EvalView(24), train=False, num_threads=1)


def png_16bit_rgb(path, pixels16: np.ndarray):
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    height, width, _ = pixels16.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels16)

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def smooth_images(count: int, size: int, seed: int) -> np.ndarray:
    """Random colour fields without pixel noise (bilinear from 4x4): 4:2:0 JPEG keeps them within a few levels."""
    coarse = np.random.default_rng(seed).integers(0, 256, (count, 4, 4, 3), dtype=np.uint8)
    return np.stack(
        [
            np.asarray(Image.fromarray(c).resize((size, size), Image.Resampling.BILINEAR))
            for c in coarse
        ]
    )


def format_zoo(root) -> dict[str, tuple[np.ndarray, bool]]:
    """Files of every format the writer must take -> (the RGB pixels a reader should see, stored byte-identical?)."""
    base = smooth_images(20, 32, seed=11)
    zoo = {}

    def add(name, image, expected=None, identical=False, **options):
        path = save(image, root / name, **options)
        zoo[name] = (
            expected
            if expected is not None
            else np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")),
            identical,
        )

    rgb = [Image.fromarray(b) for b in base]
    add("jpeg/baseline rgb.jpg", rgb[0], identical=True, format="JPEG", quality=90)
    add("jpeg/gray.jpg", rgb[1].convert("L"), identical=True, format="JPEG")
    add("jpeg/UPPER.JPEG", rgb[2], identical=True, format="JPEG")
    add("jpeg/progressive.jpg", rgb[3], format="JPEG", progressive=True)
    add("jpeg/cmyk.jpg", rgb[4].convert("CMYK"), format="JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    add("jpeg/rotated.jpg", rgb[5], format="JPEG", exif=exif, quality=95)
    rotated = zoo["jpeg/rotated.jpg"][0]
    assert not np.array_equal(
        rotated, np.asarray(Image.open(root / "jpeg/rotated.jpg").convert("RGB"))
    )  # the rotation matters
    add("png/rgb.png", rgb[6])
    rgba = rgb[7].copy()
    rgba.putalpha(Image.fromarray(base[8][..., 0]))
    add("png/rgba.png", rgba, expected=np.asarray(rgb[7]))  # alpha dropped, as convert("RGB") does
    add("png/gray.png", rgb[9].convert("L"))
    add(
        "png/palette transparency.png",
        rgb[10].convert("P", palette=Image.Palette.ADAPTIVE),
        transparency=0,
    )
    gray16 = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    add(
        "png/gray16.png",
        Image.fromarray(gray16),
        expected=np.repeat(np.rint(gray16 / 257.0).astype(np.uint8)[..., None], 3, 2),
    )
    rgb16 = base[12].astype(np.uint16) * 257 + 128
    png_16bit_rgb(root / "png/rgb16.png", rgb16)
    zoo["png/rgb16.png"] = (base[12], False)
    frames = [
        rgb[13].quantize(64, dither=Image.Dither.NONE),
        rgb[14].quantize(64, dither=Image.Dither.NONE),
    ]
    save(
        frames[0], root / "other/animated.gif", save_all=True, append_images=frames[1:], duration=50
    )
    zoo["other/animated.gif"] = (np.asarray(frames[0].convert("RGB")), False)  # the first frame
    add("other/image.tiff", rgb[15], format="TIFF")
    add("other/image.bmp", rgb[16], format="BMP")
    add("other/lossless.webp", rgb[17], format="WEBP", lossless=True)
    add("other/image.ppm", rgb[18], format="PPM")
    return zoo


def test_every_format_round_trips_to_baseline_jpeg_with_its_source_path(tmp_path, capsys):
    zoo = format_zoo(tmp_path / "zoo")
    names = sorted(zoo)
    (tmp_path / "zoo" / "labels.csv").write_text(
        "path,label\n" + "".join(f'"{name}",{i}\n' for i, name in enumerate(names))
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "write",
                "list",
                str(tmp_path / "zoo" / "labels.csv"),
                str(out / "f-%06d.tar"),
                "--quiet",
                "--workers",
                "1",
                "--max_count",
                "6",
            ]
        )
        == 0
    )
    stored = {json.loads(s["json"])["path"]: s for s in stored_samples(out)}
    assert set(stored) == set(names)
    decoded_by_pil = {}
    for index, name in enumerate(names):
        sample, (expected, identical) = stored[name], zoo[name]
        assert sample["__key__"] == path_key(name) and int(sample["cls"]) == index
        data = sample["jpg"]
        image = Image.open(io.BytesIO(data))
        assert (
            image.format == "JPEG"
            and jpeg_frame_type(data) == "baseline"
            and image.mode in ("RGB", "L")
        ), name
        assert (data == (tmp_path / "zoo" / name).read_bytes()) == identical, (
            name
        )  # copied exactly when it can be
        decoded_by_pil[index] = np.asarray(image.convert("RGB")).astype(np.float32)
        error = np.abs(decoded_by_pil[index] - expected).mean()
        assert error < 4.0, f"{name}: mean error {error:.1f} levels against the source"
    # DALI's CPU decoder, through the project's loader (identity geometry: 32 px resized to 32, cropped to 32)
    seen = set()
    loader = DaliLoader(
        out,
        5,
        EvalView(32, 32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        train=False,
        num_threads=1,
    )
    for images, labels in loader:
        for image, label in zip(images, labels.tolist()):
            by_dali = image.permute(1, 2, 0).numpy() * 255
            assert np.abs(by_dali - decoded_by_pil[label]).mean() < 1.0, names[label]
            seen.add(label)
    assert seen == set(range(len(names)))
    record = json.loads((out / "shardset.json").read_text())
    assert (
        record["copied"] == 3
        and record["changes"]["EXIF-rotated"] == 1
        and record["changes"]["progressive JPEG"] == 1
    )
    assert record["changes"]["CMYK JPEG"] == 1 and record["changes"]["GIF"] == 1
    capsys.readouterr()
    assert main(["verify", str(out), "--workers", "1", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert (
        "labelled (" in text
        and "3 stored byte-identical" in text
        and "EXIF-rotated 1" in text
        and "pre-resize at write time: none" in text
    )


def test_corrupt_files_are_named_then_skipped(tmp_path):
    paths = nested_unlabelled_tree(tmp_path / "photos", count=6)
    victim = tmp_path / "photos" / paths[2]
    victim.write_bytes(victim.read_bytes()[:300])
    (tmp_path / "photos" / "top" / "fake.png").write_text("this is text")
    out = str(tmp_path / "out" / "s-%06d.tar")
    with pytest.raises(ShardError) as error:
        write_source(images_source(tmp_path / "photos"), out, progress=False)
    assert str(victim) in str(error.value) or "fake.png" in str(error.value)
    report = write_source(images_source(tmp_path / "photos"), out, on_error="skip", progress=False)
    reasons = dict(report.skipped)
    assert set(reasons) == {str(victim), str(tmp_path / "photos" / "top" / "fake.png")}
    assert (
        "truncated" in reasons[str(victim)]
        and "not a decodable image" in reasons[str(tmp_path / "photos" / "top" / "fake.png")]
    )
    assert report.written == 5


def test_size_limits_at_write_time_are_applied_and_stated(tmp_path, capsys):
    root = tmp_path / "big"
    save(
        Image.fromarray(random_images(1, 64, seed=1)[0]).resize((96, 64)),
        root / "wide.jpg",
        format="JPEG",
    )
    save(Image.fromarray(random_images(1, 16, seed=2)[0]), root / "small.jpg", format="JPEG")
    save(Image.fromarray(random_images(1, 64, seed=3)[0]).resize((40, 80)), root / "tall.png")
    out = tmp_path / "out"
    assert (
        main(
            [
                "write",
                "images",
                str(root),
                str(out / "r-%06d.tar"),
                "--max_side",
                "48",
                "--quiet",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    sizes = {
        json.loads(s["json"])["path"]: Image.open(io.BytesIO(s["jpg"])).size
        for s in stored_samples(out)
    }
    assert sizes == {
        "wide.jpg": (48, 32),
        "small.jpg": (16, 16),
        "tall.png": (24, 48),
    }  # never enlarged
    capsys.readouterr()
    assert main(["verify", str(out), "--workers", "1", "--quiet"]) == 0
    assert "pre-resize at write time: max side 48 px (2 images resized)" in capsys.readouterr().out
    policy = ImagePolicy(shorter_side=20)
    assert prepare_file((root / "wide.jpg").read_bytes(), policy).size == (30, 20)
    with pytest.raises(ValueError):
        ImagePolicy(max_side=10, shorter_side=10)


def test_list_file_variants(tmp_path):
    images = random_images(4, 16, seed=3)
    for i, image in enumerate(images):
        save(
            Image.fromarray(image), tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", format="JPEG"
        )
    (tmp_path / "train_classes.json").write_text(json.dumps({"classes": ["n01", "n02", "n03"]}))
    tsv = tmp_path / "val.tsv"
    tsv.write_text(
        "# ImageNet-style validation labels\n"
        + "".join(f"ILSVRC2012_val_{i:08d}.JPEG\tn0{1 + i % 3}\n" for i in range(4))
    )
    source = list_source(tsv, root=tmp_path / "val", classes_file=tmp_path / "train_classes.json")
    assert source.classes == ["n01", "n02", "n03"]
    assert {path: label for path, label in zip(source.paths, source.labels)} == {
        f"ILSVRC2012_val_{i:08d}.JPEG": i % 3 for i in range(4)
    }
    unlabelled = tmp_path / "u.csv"
    unlabelled.write_text("".join(f"val/ILSVRC2012_val_{i:08d}.JPEG\n" for i in range(4)))
    assert list_source(unlabelled).labels is None
    for text, message in [
        ("a.JPEG,1,extra\n", "line 1"),
        ("val/x.JPEG,1\nval/x.JPEG,2\n", "lines 1 and 2"),
        ("val/ILSVRC2012_val_00000000.JPEG,1\nval/ILSVRC2012_val_00000001.JPEG\n", "line 2"),
        ("../outside.jpg,1\n", "line 1"),
        ("", "lists no files"),
    ]:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(ShardError, match=message):
            list_source(bad)
    wrong_class = tmp_path / "wrong.tsv"
    wrong_class.write_text("ILSVRC2012_val_00000000.JPEG\tn09\n")
    with pytest.raises(ShardError, match="class 'n09' is not in"):
        list_source(
            wrong_class, root=tmp_path / "val", classes_file=tmp_path / "train_classes.json"
        )
    missing = tmp_path / "missing.csv"
    missing.write_text("val/ILSVRC2012_val_00000000.JPEG,0\nval/gone.JPEG,1\n")
    with pytest.raises(ShardError, match="gone.JPEG: listed file does not exist"):
        write_source(list_source(missing), str(tmp_path / "o" / "m-%06d.tar"), progress=False)


def test_cifar_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as archive:
        for name, obj in [("batches.meta", {"label_names": ["a"]}), ("data_batch_1", Exploit())]:
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match="posix.system|os.system"):
        pixel_sources.cifar_source(tmp_path / "evil.tar.gz", "train")
    assert not marker.exists()


# --------------------------------------------------------------------------- resumable, failure-safe writes


def labelled_tree(root, count=30):
    images = random_images(count, 16, seed=8)
    for i, image in enumerate(images):
        save(Image.fromarray(image), root / f"class {i % 3}" / f"img.{i:03d}.jpg", format="JPEG")
    save(Image.fromarray(images[0]), root / "class 1" / "re-encoded.png")
    return root


def shard_bytes(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))} | {
        p.name: p.read_bytes() for p in sorted(directory.glob("*.idx"))
    }


def assert_no_partial_shard(directory):
    """Whatever stopped the write: no temporary left, every shard under its final name complete and indexed."""
    assert not list(directory.glob("*.tmp")) and not list(directory.glob(".*.tmp")), sorted(
        p.name for p in directory.iterdir()
    )
    for tar in directory.glob("*.tar"):
        count, problems, _ = verify_shard(tar, require_labels=True)
        assert not problems and count == read_index(tar).num_samples, problems
    assert all(
        idx.with_suffix(".tar").exists() for idx in directory.glob("*.idx")
    )  # no index without its shard


class Fault(Exception):
    pass


def fail_on_call(number, exception=Fault):
    calls = {"n": 0}

    def maybe_fail(*_, **__):
        calls["n"] += 1
        if calls["n"] == number:
            raise exception(f"injected failure at call {number}")

    return maybe_fail


def inject_bad_input(monkeypatch, root):
    victim = root / folder_source(root).paths[13]  # mid-shard: the 2nd sample of the 4th shard of 4
    good = victim.read_bytes()
    victim.write_bytes(good[:100])
    return lambda: victim.write_bytes(good)


def inject(monkeypatch, target, attribute, number, exception=Fault):
    original = getattr(target, attribute)
    fail = fail_on_call(number, exception)

    def wrapped(*args, **kwargs):
        fail()
        return original(*args, **kwargs)

    monkeypatch.setattr(target, attribute, wrapped)
    return lambda: monkeypatch.setattr(target, attribute, original)


FAULTS = {
    "corrupt input mid-shard (on_error stop)": (inject_bad_input, ShardError),
    "building an index": (lambda mp, _: inject(mp, shardwriter, "index_text", 3), Fault),
    # os.replace calls: classes.json, record, then per shard its index, the shard, the record: 6 and 7 are shard 2's
    "renaming an index into place": (lambda mp, _: inject(mp, shardwriter.os, "replace", 6), Fault),
    "renaming a shard into place": (lambda mp, _: inject(mp, shardwriter.os, "replace", 7), Fault),
    "updating the set's record": (
        lambda mp, _: inject(mp, source_writer, "write_set_record", 4),
        Fault,
    ),
    "interrupt while adding a sample": (
        lambda mp, _: inject(mp, shardwriter.ShardWriter, "add", 11, KeyboardInterrupt),
        KeyboardInterrupt,
    ),
    "disk full while writing a member": (
        lambda mp, _: inject(mp, shardwriter.tarfile.TarFile, "addfile", 40, OSError),
        OSError,
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_failed_write_leaves_no_partial_shard_and_resumes_to_identical_set(
    tmp_path, monkeypatch, fault
):
    root = labelled_tree(tmp_path / "tree")
    write_source(
        folder_source(root), str(tmp_path / "reference" / "t-%06d.tar"), max_count=4, progress=False
    )
    reference = shard_bytes(tmp_path / "reference")
    out = tmp_path / "out"
    make_fault, expected = FAULTS[fault]
    undo = make_fault(monkeypatch, root)
    with pytest.raises(expected):
        write_source(folder_source(root), str(out / "t-%06d.tar"), max_count=4, progress=False)
    assert_no_partial_shard(out)
    finished = json.loads((out / "shardset.json").read_text())["shards"]
    assert len(finished) >= 1 and not json.loads((out / "shardset.json").read_text())["complete"]
    assert not (
        out / "classes.json"
    ).exists()  # only a finished labelled set has one (benchmarks' caches rely on it)
    assert any(
        "did not finish" in line for line in describe_set(shard_paths(out))
    )  # what `verify` prints
    undo()
    for stale in (
        ".t-000009.idx.k3j4.tmp",
        ".shardset.json.x9.tmp",
        "t-000009.tar.tmp",
        "t-000012.idx",
    ):  # what a killed run leaves
        (out / stale).write_bytes(b"partial")
    report = write_source(folder_source(root), str(out / "t-%06d.tar"), max_count=4, progress=False)
    assert report.resumed_from == len(finished) and report.written == 31
    assert shard_bytes(out) == reference and not list(out.glob("*.tmp"))
    assert json.loads((out / "shardset.json").read_text())["complete"]
    assert (out / "classes.json").read_text() == (
        tmp_path / "reference" / "classes.json"
    ).read_text()


def test_killed_write_resumes_where_it_stopped(tmp_path):
    """SIGKILL mid-write (no cleanup runs): the rerun keeps the recorded shards, redoes the rest, and gives the
    same set as an uninterrupted write."""
    root = labelled_tree(tmp_path / "tree", count=60)
    reference = tmp_path / "reference"
    write_source(folder_source(root), str(reference / "t-%06d.tar"), max_count=5, progress=False)
    out = tmp_path / "out"
    slow = (
        "import sys, time\nimport simclr_dali.pipeline.shards.writer as s\nadd = s.ShardWriter.add\n"
        "s.ShardWriter.add = lambda self, *a, **k: (time.sleep(0.03), add(self, *a, **k))[1]\n"
        "from simclr_dali.pipeline.shards.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            slow,
            "write",
            "folder",
            str(root),
            str(out / "t-%06d.tar"),
            "--max_count",
            "5",
            "--workers",
            "1",
            "--quiet",
        ],
        cwd=ROOT,
    )
    recorded = []
    deadline = time.monotonic() + 60
    while len(recorded) < 3 and time.monotonic() < deadline and child.poll() is None:
        try:
            recorded = json.loads((out / "shardset.json").read_text())["shards"]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the write finished before it could be killed"
    recorded = json.loads((out / "shardset.json").read_text())["shards"]
    report = write_source(folder_source(root), str(out / "t-%06d.tar"), max_count=5, progress=False)
    assert report.resumed_from == len(recorded) >= 3
    assert shard_bytes(out) == shard_bytes(reference) and not list(out.glob("*.tmp"))


def test_finished_other_and_foreign_writes(tmp_path, capsys):
    """A finished write is left alone; a different write into the same directory is refused naming what differs
    (until --overwrite); shards without a record are not overwritten silently."""
    root = labelled_tree(tmp_path / "tree", count=9)
    out = tmp_path / "out"
    command = [
        "write",
        "folder",
        root,
        out / "t-%06d.tar",
        "--quiet",
        "--workers",
        "1",
        "--max_count",
        "4",
    ]
    assert run_cli(command, capsys)[0] == 0
    before = shard_bytes(out)
    assert (
        main([str(a) for a in command]) == 0
        and "nothing to do" in capsys.readouterr().out
        and shard_bytes(out) == before
    )
    status, lines = run_cli(command + ["--quality", "80"], capsys)
    assert (
        status == 2
        and len(lines) == 1
        and "quality: 95 -> 80" in lines[0]
        and "--overwrite" in lines[0]
    ), lines
    save(Image.fromarray(random_images(1, 16)[0]), root / "class 2" / "new.jpg", format="JPEG")
    status, lines = run_cli(command, capsys)
    assert (
        status == 2
        and "inputs: folder" in lines[0]
        and "with 10 -> folder" in lines[0]
        and "with 11" in lines[0]
    ), lines
    assert shard_bytes(out) == before
    assert run_cli(command + ["--quality", "80", "--overwrite"], capsys)[0] == 0
    record = json.loads((out / "shardset.json").read_text())
    assert (
        record["settings"]["quality"] == 80 and record["num_samples"] == 11 and record["complete"]
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "t-000000.tar").write_bytes((out / "t-000000.tar").read_bytes())
    status, lines = run_cli(
        ["write", "folder", root, foreign / "t-%06d.tar", "--quiet", "--workers", "1"], capsys
    )
    assert status == 2 and "no shardset.json" in lines[0] and "--overwrite" in lines[0], lines


def test_bounded_window_holds_at_most_window_inputs(tmp_path, monkeypatch):
    """Inputs taken from the source but not yet written never exceed the window, whatever the worker speed."""
    root = tmp_path / "tree"
    for i, image in enumerate(random_images(150, 16, seed=1)):
        save(Image.fromarray(image), root / f"{i % 7}" / f"{i}.{'png' if i % 5 == 0 else 'jpg'}")
    source = images_source(root)
    counts = {"taken": 0, "written": 0, "peak": 0}
    payload = source.payload

    def taking(position):
        counts["taken"] += 1
        counts["peak"] = max(counts["peak"], counts["taken"] - counts["written"])
        return payload(position)

    source.payload = taking
    add = shardwriter.ShardWriter.add

    def writing(self, *args, **kwargs):
        counts["written"] += 1
        time.sleep(0.002)  # a slow tar writer (network filesystem): readers must not run ahead
        return add(self, *args, **kwargs)

    monkeypatch.setattr(shardwriter.ShardWriter, "add", writing)
    report = write_source(
        source, str(tmp_path / "out" / "w-%06d.tar"), workers=2, window=8, progress=False
    )
    assert report.written == 150 and counts["written"] == 150
    assert 2 <= counts["peak"] <= 8, counts
    # the same bound for the ordered map alone, and its order
    state = {"taken": 0, "yielded": 0, "peak": 0}

    def items():
        for i in range(64):
            state["taken"] += 1
            state["peak"] = max(state["peak"], state["taken"] - state["yielded"])
            yield np.full((2, 2), i, np.uint8)

    results = []
    for result in ordered_map(prepare_chunk, items(), 2, 5, ImagePolicy(pixel_format="png")):
        state["yielded"] += 1
        results.append(np.asarray(Image.open(io.BytesIO(result.data)))[0, 0])
    assert results == list(range(64)) and state["peak"] <= 5


# --------------------------------------------------------------------------- subsets from official lists


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """A labelled set with ImageNet's train layout: WNID/WNID_NUMBER.JPEG, 3 classes x 8."""
    root = tmp_path_factory.mktemp("imagenet_like")
    images = random_images(24, 16, seed=21)
    for i, image in enumerate(images):
        wnid = f"n0{1440764 + i % 3}"
        save(
            Image.fromarray(image), root / "train" / wnid / f"{wnid}_{1000 + i}.JPEG", format="JPEG"
        )
    write_source(
        folder_source(root / "train"),
        str(root / "shards" / "train-%06d.tar"),
        max_count=10,
        progress=False,
    )
    return root


def test_official_subset_list_selects_exactly_the_named_files(imagenet_like, tmp_path):
    chosen = [
        "n01440764_1000.JPEG",
        "n01440765_1004.JPEG",
        "n01440766_1023.JPEG",
        "n01440764_1012.JPEG",
    ]
    listing = tmp_path / "1percent.txt"
    listing.write_text(
        "\n".join(chosen + ["", "n01440764_1000.JPEG"]) + "\n"
    )  # a blank and a repeated line
    subset, how = subset_for(imagenet_like / "shards", 0.01, 0, subset_list=str(listing))
    assert how == "listed" and subset.list_file == str(listing)
    assert sorted(key_path(key).rsplit("/", 1)[-1] for key in subset.keys) == sorted(chosen)
    assert {label: len(keys) for label, keys in subset.keys_per_class.items()} == {0: 2, 1: 1, 2: 1}
    assert subset.num_samples == 4 and abs(subset.label_fraction - 4 / 24) < 1e-12
    # the same through --subset_file with a .txt name, and the loader reads exactly those samples
    assert (
        subset_for(imagenet_like / "shards", 0.01, 0, subset_file=str(listing))[0].keys
        == subset.keys
    )
    loader = DaliLoader(
        imagenet_like / "shards",
        8,
        AugmentedView(classifier_augment(16)),
        train=True,
        keys=subset.keys,
        num_threads=1,
    )
    assert loader.num_samples == 4 and sorted(
        label for _, labels in loader for label in labels.tolist()
    ) == [
        0,
        0,
        1,
        2,
    ]


def test_evaluate_takes_subset_list_flag():
    from simclr_dali import evaluate

    args = evaluate.parse_args(
        ["--train_shards", "t", "--val_shards", "v", "--subset_list", "1percent.txt"]
    )
    assert args.subset_list == "1percent.txt" and args.subset_file is None


def test_subset_list_errors_name_what_is_wrong(imagenet_like, tmp_path):
    with pytest.raises(SubsetError, match="nope.txt does not exist"):
        subset_for(imagenet_like / "shards", 0.01, 0, subset_list=str(tmp_path / "nope.txt"))
    listing = tmp_path / "list.txt"
    listing.write_text("n01440764_1000.JPEG\nn09999999_1.JPEG\nn01440764_1003.JPEG\n")
    with pytest.raises(
        SubsetError, match=r"1 of its 3 files are not in the training shards.*n09999999_1\.JPEG"
    ):
        subset_for(imagenet_like / "shards", 0.01, 0, subset_list=str(listing))
    with pytest.raises(SubsetError, match="not both"):
        subset_for(
            imagenet_like / "shards",
            0.01,
            0,
            subset_list=str(listing),
            subset_file=str(tmp_path / "s.json"),
        )
    listing.write_text(
        "n01440765/n01440765_1001.JPEG\n"
    )  # a path selects by the whole relative path
    assert len(subset_for(imagenet_like / "shards", 0.01, 0, subset_list=str(listing))[0].keys) == 1


def test_subset_list_needs_stored_source_paths(small_shards, tmp_path):
    directory, _ = small_shards
    (tmp_path / "old").mkdir()
    tar = tmp_path / "old" / "old-000000.tar"
    with wds.TarWriter(
        str(tar)
    ) as writer:  # the format before source paths were stored: image + label only
        for i, image in enumerate(random_images(4, 16)):
            writer.write(
                {"__key__": f"{i:08d}", "jpg": pixel_sources.encode_jpeg(image), "cls": b"1"}
            )
    shardset.write_index(tar)
    (tmp_path / "list.txt").write_text("x.JPEG\n")
    with pytest.raises(
        ShardError,
        match=r"old-000000.tar: sample key 00000000 has no source path \(\.json\); .* rewrite them",
    ):
        subset_for(tar.parent, 0.01, 0, subset_list=str(tmp_path / "list.txt"))


# --------------------------------------------------------------------------- the shard CLI's bad inputs


def run_cli(argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, [line for line in captured.err.splitlines() if line.strip()]


def make_bad_input(kind, tmp_path):
    """-> (argv, a string the one error line must contain)."""
    out = str(tmp_path / "out" / "s-%06d.tar")
    text = tmp_path / "not-a-tar.tar.gz"
    text.write_text("hello")
    if kind == "cifar: not a tar":
        return ["write", "cifar", text, out, "--split", "train"], str(text)
    if kind == "cifar: a tar that is not CIFAR":
        with tarfile.open(tmp_path / "other.tar", "w") as archive:
            archive.add(text, arcname="readme.txt")
        return [
            "write",
            "cifar",
            tmp_path / "other.tar",
            out,
            "--split",
            "train",
        ], "other.tar is not a CIFAR python tarball"
    if kind == "arrays: not an npz":
        return ["write", "arrays", text, out], str(text)
    if kind == "arrays: an npz without arrays":
        np.savez(tmp_path / "empty.npz")
        return ["write", "arrays", tmp_path / "empty.npz", out], "empty.npz holds no arrays"
    if kind == "arrays: an npz with no images":
        np.savez(
            tmp_path / "zero.npz", images=np.zeros((0, 8, 8, 3), np.uint8), labels=np.zeros(0, int)
        )
        return ["write", "arrays", tmp_path / "zero.npz", out], "zero.npz: holds no images"
    if kind == "arrays: a .npy":
        np.save(tmp_path / "one.npy", np.zeros((2, 8, 8, 3), np.uint8))
        return ["write", "arrays", tmp_path / "one.npy", out], "one.npy is a single .npy array"
    if kind == "verify --workers -1":
        return ["verify", tmp_path, "--workers", "-1"], "--workers"
    if kind == "verify --workers 0":
        return ["verify", tmp_path, "--workers", "0"], "--workers"
    if kind == "write --workers 0":
        return ["write", "synthetic", out, "--workers", "0"], "--workers"
    if kind == "output directory cannot be created":
        return ["write", "synthetic", str(text / "sub" / "s-%06d.tar")], str(text / "sub")
    if kind == "pattern with two numbers":
        return ["write", "synthetic", str(tmp_path / "s-%d-%d.tar")], "2 shard numbers"
    if kind == "pattern without a number":
        return ["write", "synthetic", str(tmp_path / "s.tar")], "0 shard numbers"
    if kind == "list file missing":
        return ["write", "list", tmp_path / "nope.csv", out], "nope.csv does not exist"
    if kind == "images folder missing":
        return ["write", "images", tmp_path / "nope", out], "nope does not exist"
    if kind == "output directory inside the image folder":
        save(Image.fromarray(random_images(1, 8)[0]), tmp_path / "photos" / "a.jpg", format="JPEG")
        return [
            "write",
            "images",
            tmp_path / "photos",
            tmp_path / "photos" / "shards" / "s-%06d.tar",
        ], "is inside the image folder"
    raise AssertionError(kind)


BAD_INPUTS = [
    "cifar: not a tar",
    "cifar: a tar that is not CIFAR",
    "arrays: not an npz",
    "arrays: an npz without arrays",
    "arrays: an npz with no images",
    "arrays: a .npy",
    "verify --workers -1",
    "verify --workers 0",
    "write --workers 0",
    "output directory cannot be created",
    "pattern with two numbers",
    "pattern without a number",
    "list file missing",
    "images folder missing",
    "output directory inside the image folder",
]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_shard_cli_bad_input_is_one_line_with_status_2(kind, tmp_path, capsys):
    argv, named = make_bad_input(kind, tmp_path)
    status, lines = run_cli(argv, capsys)
    assert status == 2 and len(lines) == 1 and named in lines[0] and "Traceback" not in lines[0], (
        lines
    )
    assert not list((tmp_path / "out").glob("*.tar")) if (tmp_path / "out").exists() else True
    assert not (tmp_path / "photos" / "shards").exists()  # refused before anything was created


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_output_directory_is_named_before_any_work(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        status, lines = run_cli(
            ["write", "images", tmp_path / "does-not-matter", locked / "s-%06d.tar"], capsys
        )
    finally:
        locked.chmod(0o700)
    assert (
        status == 2 and len(lines) == 1 and str(locked) in lines[0] and "not writable" in lines[0]
    )


def test_output_patterns():
    assert output_pattern("d/train-%06d.tar") == "d/train-%06d.tar"
    assert output_pattern("d/train-{000000..999999}.tar") == "d/train-%06d.tar"
    assert (
        output_pattern("d/100%-{0000..9999}.tar") == "d/100%%-%04d.tar"
    )  # in brace notation '%' is literal
    assert output_pattern("d/100%%-%04d.tar") == "d/100%%-%04d.tar"
    for bad in (
        "d/t-%d-%d.tar",
        "d/t.tar",
        "d/t-%s.tar",
        "d/t-{0..9}-{0..9}.tar",
        "d/t-%06d.tgz",
        "d/%03d/t.tar",
        "d/{00..99}-%d.tar",
    ):
        with pytest.raises(ShardError):
            output_pattern(bad)


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(
    not (SHARED_DATA / "imagenet-sample").is_dir(), reason="needs ../shared/data/imagenet-sample"
)
def test_real_imagenet_jpegs_copied_or_turned_upright(tmp_path):
    """Real ImageNet JPEGs: baseline ones are stored byte-identical, the EXIF-rotated ones re-encoded upright."""
    files = sorted((SHARED_DATA / "imagenet-sample").glob("*.JPEG"))
    rotated = [f for f in files if Image.open(f).getexif().get(0x0112, 1) != 1][:2]
    chosen = rotated + files[:6]
    for f in chosen:
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / f.name).write_bytes(f.read_bytes())
    write_source(
        images_source(tmp_path / "src"), str(tmp_path / "out" / "i-%06d.tar"), progress=False
    )
    for sample in stored_samples(tmp_path / "out"):
        source = tmp_path / "src" / json.loads(sample["json"])["path"]
        if source.name in {f.name for f in rotated}:
            upright = ImageOps.exif_transpose(Image.open(source)).convert("RGB")
            stored = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            assert (
                stored.size == upright.size
                and np.abs(np.asarray(stored, np.float32) - np.asarray(upright, np.float32)).mean()
                < 3
            )
        else:
            assert sample["jpg"] == source.read_bytes()

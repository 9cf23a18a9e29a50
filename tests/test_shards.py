"""Shard tools: write (folder, arrays, CIFAR tarball, synthetic), index, verify, and their errors."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import webdataset as wds
from conftest import ROOT, SHARED_DATA, random_images
from PIL import Image

from simclr_dali.pipeline.shards.cli import main
from simclr_dali.pipeline.shards.pixel_sources import array_samples, synthetic_images
from simclr_dali.pipeline.shards.shardset import (
    ShardError,
    brace_notation,
    build_index,
    read_index,
    shard_paths,
)
from simclr_dali.pipeline.shards.source_writer import write_source
from simclr_dali.pipeline.shards.sources import folder_source
from simclr_dali.pipeline.shards.verify import verify_shards
from simclr_dali.pipeline.shards.writer import Sample, write_shards


def write_folder_tree(root, num_classes=11, per_class=3, size=16):
    """ROOT/CLASS/NNNN.jpg with 11 classes (so a label >= 10 occurs); returns {file stem: class index}."""
    images = random_images(num_classes * per_class, size, seed=4)
    expected = {}
    for c in range(num_classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = images[c * per_class + i]
            Image.fromarray(image).save(folder / f"{i:04d}.jpg", quality=95)
            expected[(c, i)] = image
    return expected


def read_back(shard_dir):
    """Every sample as (label, decoded image) via the webdataset library (a third-party reader)."""
    shards = [str(p) for p in sorted(shard_dir.glob("*.tar"))]
    dataset = (
        wds.WebDataset(shards, shardshuffle=False, empty_check=False)
        .decode("rgb8")
        .to_tuple("jpg", "cls")
    )
    return [(int(label), np.asarray(image)) for image, label in dataset]


def test_folder_round_trip_with_eleven_classes(tmp_path):
    write_folder_tree(tmp_path / "images", num_classes=11, per_class=3)
    code = main(
        [
            "write",
            "folder",
            str(tmp_path / "images"),
            str(tmp_path / "out" / "train-{000000..999999}.tar"),
            "--max-count",
            "10",
            "--quiet",
        ]
    )
    assert code == 0
    shards = sorted((tmp_path / "out").glob("*.tar"))
    assert [p.name for p in shards] == [
        f"train-{i:06d}.tar" for i in range(4)
    ]  # 33 samples, 10 per shard
    assert all(p.with_suffix(".idx").exists() for p in shards)
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())["classes"]
    assert classes == [f"class_{c:02d}" for c in range(11)]  # sorted folder names = label order
    samples = read_back(tmp_path / "out")
    assert len(samples) == 33
    assert sorted(label for label, _ in samples) == sorted(list(range(11)) * 3)
    # Every image came back (JPEG bytes are copied, not re-encoded): match each to its source file.
    sources = {
        (c, i): np.asarray(
            Image.open(tmp_path / "images" / f"class_{c:02d}" / f"{i:04d}.jpg").convert("RGB")
        )
        for c in range(11)
        for i in range(3)
    }
    for label, image in samples:
        assert any(np.array_equal(image, src) for (c, _), src in sources.items() if c == label)


def test_classes_json_order_and_shards_stable_across_worker_counts(tmp_path):
    """The same inputs and seed give the same bytes whether one process or two spawned workers prepare them."""
    write_folder_tree(tmp_path / "images", num_classes=11, per_class=2)
    (tmp_path / "images" / "class_03" / "extra.png").write_bytes(
        b""
    )  # replaced below by a real PNG (re-encoded)
    Image.fromarray(random_images(1, 16, seed=9)[0]).save(
        tmp_path / "images" / "class_03" / "extra.png"
    )
    for run, workers in (("a", "1"), ("b", "2")):
        out = str(tmp_path / run / "s-%06d.tar")
        command = [
            "write",
            "folder",
            str(tmp_path / "images"),
            out,
            "--quiet",
            "--seed",
            "3",
            "--workers",
            workers,
        ]
        assert main(command + ["--window", "3", "--max_count", "7"]) == 0
    assert (tmp_path / "a" / "classes.json").read_text() == (
        tmp_path / "b" / "classes.json"
    ).read_text()
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert len(names) == 4 and names == sorted(p.name for p in (tmp_path / "b").glob("*.tar"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_shard_size_by_bytes(tmp_path):
    images = random_images(30, 32)

    small = write_shards(
        array_samples(images, np.zeros(30, int)),
        str(tmp_path / "b-%06d.tar"),
        ["x"],
        max_bytes=8_000,
        progress=False,
    )
    large = write_shards(
        array_samples(images, np.zeros(30, int)),
        str(tmp_path / "c-%06d.tar"),
        ["x"],
        max_bytes=30_000,
        progress=False,
    )
    assert (
        len(small.shards) > len(large.shards) > 1
    )  # webdataset counts payload bytes, so files run a little larger
    for report in (small, large):
        assert sum(read_index(p).num_samples for p in report.shards) == 30


def test_arrays_cli_and_verify(tmp_path):
    np.savez(tmp_path / "data.npz", images=random_images(25, 16), labels=np.arange(25) % 13)
    assert (
        main(
            ["write", "arrays", str(tmp_path / "data.npz"), str(tmp_path / "a-%06d.tar"), "--quiet"]
        )
        == 0
    )
    total, problems = verify_shards(shard_paths(str(tmp_path)), progress=False, workers=1)
    assert (total, problems) == (25, [])
    assert sorted(label for label, _ in read_back(tmp_path)) == sorted(np.arange(25) % 13)


def make_cifar_tarball(path, num_classes=10):
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as archive:

        def add(name, obj):
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

        add("batches.meta", {"label_names": [f"name{i}" for i in range(num_classes)]})
        for part in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            add(
                part,
                {
                    "data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                    "labels": list(rng.integers(0, num_classes, 4)),
                },
            )


def test_cifar_tarball(tmp_path):
    make_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    assert (
        main(
            [
                "write",
                "cifar",
                str(tmp_path / "cifar-10-python.tar.gz"),
                str(tmp_path / "train-%06d.tar"),
                "--split",
                "train",
                "--quiet",
            ]
        )
        == 0
    )
    assert sum(read_index(p).num_samples for p in shard_paths(str(tmp_path))) == 20
    assert json.loads((tmp_path / "classes.json").read_text())["classes"][0] == "name0"


def test_synthetic_is_deterministic_and_balanced():
    a, labels = synthetic_images(10, 5, 32, seed=7)
    b, _ = synthetic_images(10, 5, 32, seed=7)
    assert np.array_equal(a, b) and a.shape == (50, 32, 32, 3)
    assert np.bincount(labels).tolist() == [5] * 10


def test_shard_specs(small_shards):
    directory, _ = small_shards
    listed = shard_paths(str(directory))
    assert len(listed) == 3
    assert shard_paths(brace_notation(listed)) == listed
    assert shard_paths(str(directory / "*.tar")) == listed
    assert brace_notation(listed).endswith("part-{000000..000002}.tar")


def test_cli_help_documents_every_command():
    for command in (
        ["write", "--help"],
        ["write", "folder", "--help"],
        ["write", "images", "--help"],
        ["write", "list", "--help"],
        ["index", "--help"],
        ["verify", "--help"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "simclr_dali.pipeline.shards.cli", *command],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0 and "usage:" in result.stdout


# ------------------------------------------------------------------ bad input


def test_folder_bad_inputs_stop_or_skip(tmp_path):
    write_folder_tree(tmp_path / "images", num_classes=11, per_class=2)
    good = (tmp_path / "images" / "class_00" / "0000.jpg").read_bytes()
    (tmp_path / "images" / "class_01" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "images" / "class_02" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / "class_99_empty").mkdir()
    (tmp_path / "images" / "stray.jpg").write_bytes(good)
    # stop (the default): the first problem is named, before anything is written
    with pytest.raises(ShardError) as error:
        write_source(
            folder_source(tmp_path / "images"), str(tmp_path / "out" / "s-%06d.tar"), progress=False
        )
    assert (
        "notes.txt" in str(error.value)
        or "class_99_empty" in str(error.value)
        or "stray.jpg" in str(error.value)
    )
    assert not list((tmp_path / "out").glob("*.tar"))
    # skip: everything bad is listed, the rest written
    out = str(tmp_path / "out2" / "s-%06d.tar")
    report = write_source(folder_source(tmp_path / "images"), out, on_error="skip", progress=False)
    reasons = {source.rsplit("/", 1)[-1]: reason for source, reason in report.skipped}
    assert set(reasons) == {"truncated.jpg", "notes.txt", "class_99_empty", "stray.jpg"}
    assert (
        "truncated" in reasons["truncated.jpg"] and "not in a class folder" in reasons["stray.jpg"]
    )
    assert report.written == 22
    record = json.loads((tmp_path / "out2" / "shardset.json").read_text())
    assert {s.rsplit("/", 1)[-1] for s, _ in record["skipped"]} == set(reasons)


def test_folder_truncated_jpeg_named_when_stopping(tmp_path):
    write_folder_tree(tmp_path / "images", num_classes=2, per_class=2)
    bad = tmp_path / "images" / "class_01" / "0001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(ShardError, match="class_01/0001.jpg"):
        write_source(
            folder_source(tmp_path / "images"), str(tmp_path / "out" / "s-%06d.tar"), progress=False
        )


def test_missing_folder_and_empty_output(tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        folder_source(tmp_path / "nope")
    assert (
        main(["write", "folder", str(tmp_path / "nope"), str(tmp_path / "o-%06d.tar"), "--quiet"])
        == 2
    )


def test_index_rejects_truncated_and_empty_tars(tmp_path, small_shards):
    directory, _ = small_shards
    data = (directory / "part-000000.tar").read_bytes()
    truncated = tmp_path / "t.tar"
    truncated.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match=r"t\.tar"):
        build_index(truncated)
    empty = tmp_path / "e.tar"
    empty.write_bytes(b"")
    with pytest.raises(ShardError, match="e.tar"):
        shard_paths(str(empty))
    with pytest.raises(ShardError, match="does not exist"):
        shard_paths(str(tmp_path / "missing-{000..002}.tar"))


def test_verify_names_bad_keys(tmp_path):

    good = Image.new("RGB", (8, 8), (10, 200, 30))
    buffer = io.BytesIO()
    good.save(buffer, format="JPEG")
    samples = [
        Sample("00000000", buffer.getvalue(), 3, "a"),
        Sample("00000001", buffer.getvalue()[:60], 4, "b"),
    ]
    report = write_shards(samples, str(tmp_path / "v-%06d.tar"), ["x"] * 5, progress=False)
    total, problems = verify_shards(report.shards, progress=False, workers=1)
    assert total == 2 and len(problems) == 1
    assert "v-000000.tar" in problems[0] and "key 00000001" in problems[0]
    assert main(["verify", str(tmp_path), "--quiet", "--workers", "1"]) == 1


@pytest.mark.skipif(
    not (SHARED_DATA / "cifar10").is_dir(),
    reason="needs ../shared/data/cifar10 (real CIFAR-10 JPEGs)",
)
def test_real_cifar_folder_subset(tmp_path):
    """Real JPEGs from the shared CIFAR-10 tree (a few per class) round-trip with sorted class labels."""
    source = SHARED_DATA / "cifar10" / "test"
    subset = tmp_path / "subset"
    for folder in sorted(source.iterdir()):
        (subset / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:3]:
            (subset / folder.name / image.name).write_bytes(image.read_bytes())
    assert (
        main(
            [
                "write",
                "folder",
                str(subset),
                str(tmp_path / "c-%06d.tar"),
                "--quiet",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    classes = json.loads((tmp_path / "classes.json").read_text())["classes"]
    assert classes == sorted(p.name for p in source.iterdir())
    assert sorted(label for label, _ in read_back(tmp_path)) == sorted(list(range(10)) * 3)


@pytest.mark.skipif(
    not (SHARED_DATA / "cifar10").is_dir(),
    reason="needs ../shared/data/cifar10 (real CIFAR-10 JPEGs)",
)
def test_real_cifar_bad_inputs_named_then_skipped(tmp_path):
    """A copy of real CIFAR-10 folders with a JPEG truncated on disk, an empty class folder and a
    non-image file: the writer names each (stop), or skips and counts them (skip)."""
    source = SHARED_DATA / "cifar10" / "test"
    tree = tmp_path / "tree"
    for folder in sorted(source.iterdir())[:3]:
        (tree / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:4]:
            (tree / folder.name / image.name).write_bytes(image.read_bytes())
    victim = sorted((tree / "automobile").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (tree / "zebra").mkdir()
    (tree / "bird" / "README.txt").write_text("not an image")
    out = str(tmp_path / "out" / "s-%06d.tar")
    assert (
        main(["write", "folder", str(tree), out, "--quiet", "--workers", "1"]) == 2
    )  # stops, naming the first problem
    assert (
        main(["write", "folder", str(tree), out, "--quiet", "--workers", "1", "--on-error", "skip"])
        == 0
    )
    report = write_source(
        folder_source(tree), str(tmp_path / "out2" / "s-%06d.tar"), on_error="skip", progress=False
    )
    named = {source.rsplit("/", 1)[-1]: reason for source, reason in report.skipped}
    assert set(named) == {victim.name, "zebra", "README.txt"}
    assert (
        "truncated" in named[victim.name]
        and "no images" in named["zebra"]
        and "not an image" in named["README.txt"]
    )
    assert report.written == 11

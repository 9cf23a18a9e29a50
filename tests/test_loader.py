"""DALI loaders on the CPU backend: views, labels, epoch semantics across simulated ranks, seeding,
exact resume, and bad input named by shard and key."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import make_shards, random_images

from simclr_dali.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig
from simclr_dali.pipeline.loader import (
    AugmentedView,
    DaliLoader,
    EvalView,
    TwoViews,
    classifier_augment,
)
from simclr_dali.pipeline.shards.pixel_sources import encode_jpeg
from simclr_dali.pipeline.shards.shardset import ShardError, write_index
from simclr_dali.pipeline.shards.writer import Sample, write_shards

CIFAR = AugmentConfig.cifar()


def test_pretrain_views_shape_dtype_and_differ(small_shards):
    directory, _ = small_shards
    loader = DaliLoader(directory, 8, TwoViews(CIFAR), train=True, seed=1)
    assert len(loader) == 103 // 8
    view1, view2 = next(iter(loader))
    for view in (view1, view2):
        assert view.shape == (8, 3, 32, 32) and view.dtype == torch.float32
        assert view.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(view).all()
    assert (view1 - view2).abs().mean() > 0.05  # independent augmentations of the same images


def test_eval_labels_decode_multi_digit(small_shards):
    directory, labels = small_shards  # labels i % 12: 10 and 11 occur
    seen = []
    for images, batch_labels in DaliLoader(directory, 16, EvalView(32, 32), train=False):
        assert images.shape[1:] == (3, 32, 32) and batch_labels.dtype == torch.int64
        seen += batch_labels.tolist()
    assert sorted(seen) == sorted(labels.tolist())
    assert max(seen) == 11


def write_identity_shards(directory, count: int = 97, per_shard: int = 25):
    """Solid-colour images whose colour encodes the sample id (survives crop, flip, resize, JPEG), label = id."""
    ids = np.arange(count)
    colours = np.stack(
        [20 + 20 * (ids % 10), 20 + 20 * (ids // 10), np.full(count, 128)], 1
    ).astype(np.uint8)
    images = np.broadcast_to(colours[:, None, None, :], (count, 24, 24, 3)).copy()
    samples = (
        Sample(f"{i:08d}", encode_jpeg(image, 100), int(i), "ids") for i, image in enumerate(images)
    )
    write_shards(
        samples,
        str(directory / "id-%06d.tar"),
        [str(i) for i in ids],
        count,
        max_count=per_shard,
        progress=False,
    )
    return directory, count


@pytest.fixture(scope="module")
def identity_shards(tmp_path_factory):
    return write_identity_shards(tmp_path_factory.mktemp("ids"))


def decode_ids(view: torch.Tensor) -> list[int]:
    """Sample ids from (plain, un-jittered) views of the identity images."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    rgb = (view.mean((2, 3)) * std + mean) * 255
    return (((rgb[:, 0] - 20) / 20).round() + 10 * ((rgb[:, 1] - 20) / 20).round()).long().tolist()


@pytest.mark.parametrize("world", [2, 3])
def test_eval_every_sample_exactly_once_across_ranks(identity_shards, world):
    directory, count = identity_shards
    for epoch in range(2):
        seen = collections.Counter()
        for rank in range(world):
            loader = DaliLoader(
                directory, 8, EvalView(24, 24), train=False, shard_id=rank, num_shards=world
            )
            for _ in range(
                epoch + 1
            ):  # the second pass checks that a loader's next epoch is whole again
                seen_this = [label for _, labels in loader for label in labels.tolist()]
            seen.update(seen_this)
        assert seen == collections.Counter(range(count))


def expected_steps(count: int, world: int, batch: int, pipelines: int) -> int:
    """Whole batches per rank: each of a rank's pipelines reads one of world * pipelines parts (differing by at
    most one sample) and makes batch / pipelines of every batch."""
    return count // (world * pipelines) // (batch // pipelines)


PIPELINES = [1, 2]  # per rank: one pipeline (the default), and two, each making half of every batch


@pytest.mark.parametrize("pipelines", PIPELINES)
def test_pretrain_epochs_see_each_sample_at_most_once_with_equal_steps(identity_shards, pipelines):
    directory, count = identity_shards
    plain = AugmentConfig(size=16, jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0)
    world, batch = 2, 8
    options = {"seed": 5, "shuffle_buffer": 64, "pipelines": pipelines, "num_shards": world}
    view = TwoViews(plain)
    loaders = [
        DaliLoader(directory, batch, view, train=True, shard_id=r, **options) for r in range(world)
    ]
    assert all(loader.pipelines == pipelines for loader in loaders)
    assert (
        len({len(loader) for loader in loaders}) == 1
    )  # DDP: every rank takes the same number of steps
    steps = len(loaders[0])
    assert steps == expected_steps(count, world, batch, pipelines)
    epochs_seen = []
    for _ in range(3):
        seen = collections.Counter()
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == steps
            for view1, view2 in batches:
                ids = decode_ids(view1)
                assert ids == decode_ids(view2)  # the two views are of the same images
                seen.update(ids)
        assert max(seen.values()) == 1 and set(seen) <= set(range(count))
        assert (
            sum(seen.values()) == world * steps * batch
        )  # only the remainder beyond full batches is dropped
        epochs_seen.append(set(seen))
    assert (
        len({frozenset(s) for s in epochs_seen}) > 1 or len(epochs_seen[0]) == count
    )  # reshuffled between epochs


@pytest.mark.parametrize("pipelines", PIPELINES)
@pytest.mark.parametrize(
    "per_shard,world", [(97, 2), (40, 3), (11, 4)]
)  # one shard for 2 ranks; uneven shards (40, 40, 17); many small
def test_one_pipeline_per_run_keeps_epochs_exact(tmp_path, per_shard, world, pipelines):
    """The training loader keeps one DALI pipeline for the whole run: across 3 epochs every rank takes the same
    steps, no sample occurs twice in an epoch (over all ranks), only the per-rank remainder beyond whole batches
    is missing, and every epoch has a new order."""
    directory, count = write_identity_shards(tmp_path, per_shard=per_shard)
    plain = AugmentConfig(size=16, jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0)
    batch, view = 8, TwoViews(plain)
    options = {"seed": 7, "shuffle_buffer": 32, "pipelines": pipelines, "num_shards": world}
    loaders = [
        DaliLoader(directory, batch, view, train=True, shard_id=r, **options) for r in range(world)
    ]
    assert all(loader.pipelines == pipelines for loader in loaders)
    iterators = [loader._iterator for loader in loaders]
    steps = expected_steps(count, world, batch, pipelines)
    orders = []
    for _ in range(3):
        seen, order = collections.Counter(), []
        for loader in loaders:
            assert len(loader) == steps
            ids = [i for view1, _ in loader for i in decode_ids(view1)]
            assert len(ids) == steps * batch
            seen.update(ids)
            order += ids
        assert max(seen.values()) == 1 and set(seen) <= set(range(count))
        orders.append(order)
    assert all(
        loader._iterator is iterator for loader, iterator in zip(loaders, iterators)
    )  # never rebuilt
    assert len({tuple(order) for order in orders}) == 3  # a new order every epoch


@pytest.mark.parametrize("pipelines", PIPELINES)
def test_resume_in_a_later_epoch(small_shards, pipelines):
    """A state saved in epoch 2 (the persistent reader has crossed an epoch boundary) resumes exactly."""
    directory, _ = small_shards
    make = lambda: DaliLoader(
        directory, 8, TwoViews(CIFAR), train=True, seed=4, pipelines=pipelines
    )
    loader = make()
    reference = [v1 for _ in range(3) for v1, _ in loader]
    loader = make()
    resumed = [v1 for v1, _ in loader]
    for view1, _ in loader:
        resumed.append(view1)
        if len(resumed) == len(loader) + 3:
            state = loader.state_dict()
            break
    restored = make()
    restored.load_state_dict(state)
    while len(resumed) < len(reference):
        resumed += [v1 for v1, _ in restored]
    assert len(resumed) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(resumed, reference))


@pytest.mark.parametrize("pipelines", PIPELINES)
def test_an_epoch_start_state_starts_a_whole_epoch(identity_shards, pipelines):
    """The state a run restarts from after bad data or with another world size (``dali_checkpoint: None``)."""
    directory, count = identity_shards
    plain = AugmentConfig(size=16, jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0)
    loader = DaliLoader(directory, 8, TwoViews(plain), train=True, seed=3, pipelines=pipelines)
    loader.load_state_dict({"shard_id": 0, "num_shards": 1, "epoch": 2, "dali_checkpoint": None})
    ids = [i for view1, _ in loader for i in decode_ids(view1)]
    assert (
        len(ids) == len(set(ids)) == expected_steps(count, 1, 8, pipelines) * 8
        and loader.epoch == 3
    )


@pytest.mark.parametrize(
    "buffer", [1, 2, 3]
)  # split between two pipelines: never below one sample each
def test_small_shuffle_buffers_split_between_pipelines(small_shards, buffer):
    directory, _ = small_shards
    loader = DaliLoader(
        directory, 8, TwoViews(CIFAR), train=True, shuffle_buffer=buffer, pipelines=2
    )
    assert loader.pipelines == 2 and sum(1 for _ in loader) == len(loader)
    with pytest.raises(ValueError, match="shuffle_buffer must be >= 1"):
        DaliLoader(directory, 8, TwoViews(CIFAR), train=True, shuffle_buffer=0)


def test_a_state_of_another_pipeline_count_resumes_exactly_or_is_refused(small_shards):
    """A checkpoint from a run with two pipelines per rank (the CPU default before it became one) resumes
    exactly in a loader built with the default; a count the batch cannot be split into is refused."""
    directory, _ = small_shards
    make = lambda **kw: DaliLoader(directory, 8, TwoViews(CIFAR), train=True, seed=4, **kw)
    old = make(pipelines=2)
    batches = iter(old)
    next(batches)
    state = old.state_dict()
    assert len(state["dali_checkpoint"]) == 2
    reference = [v1 for v1, _ in batches]
    restored = make()
    assert restored.pipelines == 1
    restored.load_state_dict(state)
    resumed = [v1 for v1, _ in restored]
    assert restored.pipelines == 2 and len(resumed) == len(reference) > 0
    assert all(torch.equal(a, b) for a, b in zip(resumed, reference))
    three = {**state, "dali_checkpoint": [*state["dali_checkpoint"], state["dali_checkpoint"][0]]}
    with pytest.raises(ValueError, match="3 DALI pipeline checkpoint.*1 pipeline"):
        make().load_state_dict(three)


def test_upper_case_member_extensions_are_read(tmp_path):
    """Third-party shards with ImageNet's own member names (``.JPEG``) read as any other JPEG member."""
    images = random_images(6, 24)
    tar = write_raw(
        tmp_path / "upper",
        [
            {"__key__": f"n0000_{i}", "JPEG": encode_jpeg(image, 95), "cls": b"3"}
            for i, image in enumerate(images)
        ],
    )
    batches = list(DaliLoader(tar.parent, 3, EvalView(24, 24), train=False))
    assert sum(len(labels) for _, labels in batches) == 6 and all(
        labels.tolist() == [3, 3, 3] for _, labels in batches
    )


@pytest.mark.parametrize("pipelines", PIPELINES)
def test_labelled_view_decodes_only_its_crop(identity_shards, pipelines):
    """The single-view classifier loader decodes the region of its random crop (ROI decode): the right image,
    its label, the view's size and normalisation (with two pipelines: each image with its own label)."""
    directory, count = identity_shards
    loader = DaliLoader(
        directory, 8, AugmentedView(classifier_augment(16)), train=True, seed=1, pipelines=pipelines
    )
    assert loader.pipelines == pipelines
    for images, labels in loader:
        assert images.shape == (8, 3, 16, 16) and images.is_contiguous(
            memory_format=torch.channels_last
        )
        assert (
            decode_ids(images) == labels.tolist()
        )  # solid colours: any crop of an image is that image's colour


def test_same_seed_same_views_other_seed_differs(small_shards):
    directory, _ = small_shards
    first = [
        next(iter(DaliLoader(directory, 8, TwoViews(CIFAR), train=True, seed=s)))[0]
        for s in (3, 3, 4)
    ]
    assert torch.equal(first[0], first[1])
    assert not torch.equal(first[0], first[2])


@pytest.mark.parametrize("pipelines", PIPELINES)
@pytest.mark.parametrize("stop", [5, 12])  # mid-epoch, and the epoch's last batch (12 per epoch)
def test_exact_resume(small_shards, stop, pipelines):
    directory, _ = small_shards
    reference = []
    loader = DaliLoader(directory, 8, TwoViews(CIFAR), train=True, seed=2, pipelines=pipelines)
    for _ in range(2):
        reference += [v1 for v1, _ in loader]
    loader = DaliLoader(directory, 8, TwoViews(CIFAR), train=True, seed=2, pipelines=pipelines)
    assert len(loader) == 12
    resumed = []
    for view1, _ in loader:
        resumed.append(view1)
        if len(resumed) == stop:
            state = loader.state_dict()
            break
    restored = DaliLoader(directory, 8, TwoViews(CIFAR), train=True, seed=2, pipelines=pipelines)
    restored.load_state_dict(state)
    while len(resumed) < len(reference):
        resumed += [v1 for v1, _ in restored]
    assert len(resumed) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(resumed, reference))


# ------------------------------------------------------------------ bad input names shard and key


def write_raw(directory, samples):
    directory.mkdir(parents=True, exist_ok=True)
    tar = directory / "raw-000000.tar"
    with wds.TarWriter(str(tar)) as writer:
        for sample in samples:
            writer.write(sample)
    write_index(tar)
    return tar


def test_corrupt_jpeg_named(tmp_path):
    images = random_images(12, 32)
    samples = [
        {"__key__": f"k{i:03d}", "jpg": encode_jpeg(im), "cls": b"1"} for i, im in enumerate(images)
    ]
    samples[7]["jpg"] = samples[7]["jpg"][: len(samples[7]["jpg"]) // 2]
    tar = write_raw(tmp_path, samples)
    with pytest.raises(ShardError) as error:
        for _ in DaliLoader(tmp_path, 4, TwoViews(CIFAR), train=True):
            pass
    assert str(tar) in str(error.value) and "key k007" in str(error.value)


def test_missing_label_named(tmp_path):
    images = random_images(12, 32)
    samples = [
        {"__key__": f"k{i:03d}", "jpg": encode_jpeg(im), **({"cls": b"3"} if i != 5 else {})}
        for i, im in enumerate(images)
    ]
    tar = write_raw(tmp_path, samples)
    with pytest.raises(ShardError) as error:
        for _ in DaliLoader(tmp_path, 4, EvalView(32), train=False):
            pass
    assert (
        str(tar) in str(error.value)
        and "key k005" in str(error.value)
        and "cls" in str(error.value)
    )


def test_bad_label_text_named(tmp_path):
    images = random_images(6, 32)
    samples = [
        {"__key__": f"k{i:03d}", "jpg": encode_jpeg(im), "cls": b"x7" if i == 2 else b"12"}
        for i, im in enumerate(images)
    ]
    tar = write_raw(tmp_path, samples)
    with pytest.raises(ShardError) as error:
        for _ in DaliLoader(tmp_path, 3, EvalView(32), train=False):
            pass
    assert str(tar) in str(error.value) and "key k002" in str(error.value)


def test_truncated_empty_missing_shards(tmp_path, small_shards):
    directory, _ = small_shards
    data = (directory / "part-000001.tar").read_bytes()
    (tmp_path / "t").mkdir()
    truncated = tmp_path / "t" / "part-000001.tar"
    truncated.write_bytes(data[: len(data) // 3])
    truncated.with_suffix(".idx").write_bytes((directory / "part-000001.idx").read_bytes())
    with pytest.raises(ShardError, match="part-000001.tar is truncated"):
        DaliLoader(tmp_path / "t", 4, TwoViews(CIFAR), train=True)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x-000000.tar").write_bytes(b"")
    with pytest.raises(ShardError, match="x-000000.tar is empty"):
        DaliLoader(tmp_path / "e", 4, EvalView(32), train=False)
    with pytest.raises(ShardError, match="does not exist"):
        DaliLoader(tmp_path / "nowhere-{000..003}.tar", 4, TwoViews(CIFAR), train=True)
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "part-000000.tar").write_bytes((directory / "part-000000.tar").read_bytes())
    with pytest.raises(ShardError, match="has no index"):
        DaliLoader(tmp_path / "n", 4, TwoViews(CIFAR), train=True)


def test_batch_larger_than_data_is_an_error(tmp_path):
    directory, _ = make_shards(tmp_path, 10)
    with pytest.raises(ShardError, match="do not fill one batch"):
        DaliLoader(directory, 8, TwoViews(CIFAR), train=True, num_shards=2)


# --------------------------------------------------------------------------- GPU decoder sizing (no GPU needed)


def test_gpu_decoder_buffers_are_sized_to_the_data():
    """nvJPEG's paddings are per DALI thread: DALI's defaults (8 MiB host, 16 MiB device) where they hold the
    largest image decoded (CIFAR's 32 px), one decoded image otherwise; never ImageNet's 211 MB for every set."""
    from simclr_dali.pipeline.augment import (
        _decoder_args,
        gpu_decoder_sized_for,
        gpu_decoder_sizing,
    )

    assert gpu_decoder_sizing(None) == {} and gpu_decoder_sizing((32, 32)) == {}
    assert gpu_decoder_sizing((1600, 1200)) == {}  # 5.5 MB decoded
    large = gpu_decoder_sizing((5980, 6430))  # ImageNet's largest training image
    assert large["device_memory_padding"] == large["host_memory_padding"] == 111 * 2**20
    assert (large["preallocate_width_hint"], large["preallocate_height_hint"]) == (5980, 6430)
    with gpu_decoder_sized_for((5980, 6430)):
        assert _decoder_args("gpu")["device_memory_padding"] == 111 * 2**20
        assert _decoder_args("cpu") == {"device": "cpu"}
    with gpu_decoder_sized_for((32, 32)):
        assert _decoder_args("gpu") == {"device": "mixed", "hw_decoder_load": 0.65}
    assert "device_memory_padding" not in _decoder_args("gpu")  # outside: DALI's defaults


def test_largest_image_is_read_from_the_headers_of_the_largest_files(tmp_path):
    from simclr_dali.pipeline.loader import largest_image
    from simclr_dali.pipeline.shards.shardset import read_index

    directory, _ = make_shards(tmp_path / "cifar", 30, size=32, per_shard=16)
    tars = sorted(directory.glob("*.tar"))
    assert largest_image([read_index(tar) for tar in tars]) == (32, 32)
    samples = [
        Sample(f"s{i}", encode_jpeg(image), 0, f"s{i}")
        for i, image in enumerate(random_images(3, 64))
    ]
    samples.append(Sample("wide", encode_jpeg(random_images(1, 96)[0][:48]), 0, "wide"))  # 96 x 48
    write_shards(
        samples,
        str(tmp_path / "mixed-%06d.tar"),
        ["c0"],
        total=len(samples),
        max_count=10,
        progress=False,
    )
    mixed = sorted(tmp_path.glob("mixed-*.tar"))
    assert largest_image([read_index(tar) for tar in mixed], candidates=10) == (96, 48)


def test_loaders_take_their_share_of_the_cores_on_both_backends():
    """DALI threads from the affinity and the local process count, GPU decoding included (no fixed cap)."""
    from simclr_dali.pipeline.loader import default_num_threads

    cores = len(os.sched_getaffinity(0))
    for device in ("gpu", "cpu"):
        assert default_num_threads(device=device) == max(1, cores)
        assert default_num_threads(2, device) == max(1, cores // 2)
        assert default_num_threads(10 * cores, device) == 1


def test_hw_decoder_load_is_a_knob():
    from simclr_dali.pipeline.augment import _decoder_args, gpu_decoder_sized_for

    with gpu_decoder_sized_for((32, 32), hw_decoder_load=0.9):
        assert _decoder_args("gpu") == {"device": "mixed", "hw_decoder_load": 0.9}
    with gpu_decoder_sized_for((5980, 6430), hw_decoder_load=0.0):
        assert _decoder_args("gpu")["hw_decoder_load"] == 0.0
        assert _decoder_args("gpu")["device_memory_padding"] == 111 * 2**20

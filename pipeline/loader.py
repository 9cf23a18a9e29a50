"""DALI loaders over WebDataset shards, yielding torch tensors on the training device.

One loader class, ``DaliLoader``, parametrised by its view of each sample (``TwoViews`` for pretraining,
``AugmentedView`` for classifiers, ``EvalView`` for feature extraction), reading with DALI's webdataset reader
sharded by rank and decoding on the GPU or the CPU by one argument. A training loader keeps one DALI pipeline
for the whole run, so no epoch waits for a decoder start-up or a shuffle-buffer refill, and stays exact: every
sample at most once per epoch, every rank the same number of steps (the reader pads each part to whole batches
and the loader drains the padding). Subsets are read through filtered copies of the DALI indexes, with no image
copied. Epoch and shuffling semantics in full: docs/design.md (*The loader*).
"""

from __future__ import annotations

import base64
import heapq
import io
import os
import re
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    decode,
    eval_view,
    gpu_decoder_sized_for,
    roi_view,
    simclr_view,
)
from .decode_check import find_undecodable, rank_part
from .shards.s3 import is_s3
from .shards.shardset import (
    IMAGE_COMPONENTS,
    MAX_IMAGE_PIXELS,
    ShardError,
    ShardIndex,
    brace_notation,
    check_shard,
    index_path,
    read_index,
    sample_key,
    shard_paths,
)

READER = "reader"
IMAGE_EXTENSIONS = ";".join(IMAGE_COMPONENTS)  # DALI webdataset reader: any of these is the image
_DALI_DTYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}


LARGEST_IMAGE_CANDIDATES = (
    8  # image files (the largest by bytes) whose headers size the GPU decoder's buffers
)


def default_num_threads(num_local_processes: int = 1, device: str = "cpu") -> int:
    """DALI CPU threads per process: this process's share of the cores it may run on (its affinity over the
    processes on this host), on either backend. On the GPU they run the reader, the views' plan operators and
    the hybrid Huffman decoding of the images the hardware decoder does not take; each also holds one nvJPEG
    device and one pinned host buffer of the largest image's size (``augment.gpu_decoder_sizing``: 111 MiB each
    for ImageNet, 1.8 GB of device memory at 16 threads, counted in docs/gpu.md's memory arithmetic)."""
    del device  # (the same share on both backends: kept for callers that name it)
    return max(1, len(os.sched_getaffinity(0)) // max(1, num_local_processes))


def largest_image(
    indexes: list[ShardIndex], candidates: int = LARGEST_IMAGE_CANDIDATES
) -> tuple[int, int] | None:
    """(width, height) of the largest (in pixels) of the ``candidates`` largest image files (in bytes) that the
    indexes list, read from their headers: what the GPU decoder's buffers are sized for (a hint: a larger image
    costs a reallocation, nothing else). None if none of them has a readable header."""
    from PIL import Image

    files = heapq.nlargest(
        candidates,
        (
            (size, offset, index.tar)
            for index in indexes
            for sample in index.samples
            for ext, (offset, size, _) in sample.items()
            if ext.lower() in IMAGE_COMPONENTS
        ),
    )
    best = None
    for size, offset, tar in files:
        with open(tar, "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        try:
            width, height = Image.open(io.BytesIO(data)).size  # the header only
        except (OSError, ValueError):  # undecodable samples are reported by the decode check
            continue
        if best is None or width * height > best[0] * best[1]:
            best = (width, height)
    return best


# DALI pipelines per training rank (``pipelines=2`` still splits a rank's part and batch). Two pipelines with half
# the threads each once filled the cores that idled at the barriers between a long chain of small CPU operators;
# with a view's per-sample work in a few compiled operators (``view_plan``, ``colour_cpu``) the second pipeline only
# adds work: on 2 AMD EPYC cores (bench.py's presets, 2 threads, measured under the bench lock) one pipeline made
# 6,900-7,200 images/s at 32 px against 4,700-5,200 for two (117-119 against 186-202 us of CPU time per image) and
# 87-104 against 66-68 images/s at 224 px. On the GPU a second pipeline would also double the decoder's buffers.
# A checkpoint of a run with another count resumes with that count (``load_state_dict``).
DEFAULT_PIPELINES = 1


def _reader(
    shards: list[Path],
    index_paths: list[Path],
    ext: list[str],
    shard_id: int,
    num_shards: int,
    shuffle: bool,
    shuffle_buffer: int,
    shuffle_seed: int,
):
    # A shuffling reader is persistent: DALI reorders the tars after each epoch with a seed all ranks share.
    epochs = (
        {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": shuffle_seed} if shuffle else {}
    )
    return fn.readers.webdataset(
        paths=[str(p) for p in shards],
        index_paths=[str(p) for p in index_paths],
        ext=ext,
        case_sensitive_extensions=False,  # .JPEG (ImageNet's own member names) is .jpeg
        missing_component_behavior="error",
        name=READER,
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=True,  # every part padded to whole batches: exact epochs, equal step counts per rank
        random_shuffle=shuffle,
        initial_fill=shuffle_buffer,
        **epochs,
    )


# --------------------------------------------------------------------------- views: what a loader makes of each sample


@dataclass(frozen=True)
class TwoViews:
    """Pretraining: two independent SimCLR views of each image (no label needed)."""

    augment: AugmentConfig = AugmentConfig()
    labelled: ClassVar[bool] = False
    outputs: ClassVar[tuple[str, ...]] = ("view1", "view2")

    def graph(self, jpegs, device, dtype):
        cfg = self.augment
        shape = fn.peek_image_shape(
            jpegs
        )  # from the header: the views' CPU work does not wait for the decoder
        if cfg.roi_decode:  # each view decodes only its own crop's region
            return tuple(roi_view(jpegs, cfg, device, dtype, shape) for _ in range(2))
        images = decode(jpegs, device)  # decoded once, cropped twice
        return simclr_view(images, cfg, dtype, shape), simclr_view(images, cfg, dtype, shape)


@dataclass(frozen=True)
class LabelledTwoViews(TwoViews):
    """Pretraining with labels (SupCon, the online probe): ``(view1, view2, labels)``; every sample needs a .cls."""

    labelled: ClassVar[bool] = True


@dataclass(frozen=True)
class AugmentedView:
    """Classifier training: one augmented view + label (by default ``classifier_augment``: crop + flip). One
    crop per image, so only its region is decoded."""

    augment: AugmentConfig
    labelled: ClassVar[bool] = True
    outputs: ClassVar[tuple[str, ...]] = ("images",)

    def graph(self, jpegs, device, dtype):
        return (roi_view(jpegs, self.augment, device, dtype),)  # the config decides the rest


@dataclass(frozen=True)
class UnlabelledView:
    """One augmented view, no label (SimCLRv2's distillation on unlabelled shards): ``(images,)``."""

    augment: AugmentConfig
    labelled: ClassVar[bool] = False
    outputs: ClassVar[tuple[str, ...]] = ("images",)

    def graph(self, jpegs, device, dtype):
        return (
            roi_view(jpegs, self.augment, device, dtype),
        )  # as AugmentedView, without the label


@dataclass(frozen=True)
class EvalView:
    """Evaluation: resize the shorter side, centre crop ``size``, normalise; + label."""

    size: int
    resize_size: int | None = (
        None  # shorter side before the crop; default ``pipeline.augment.eval_resize(size)``
    )
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    labelled: ClassVar[bool] = True
    outputs: ClassVar[tuple[str, ...]] = ("images",)

    def graph(self, jpegs, device, dtype):
        return (
            eval_view(
                decode(jpegs, device), self.size, self.resize_size, self.mean, self.std, dtype
            ),
        )


View = TwoViews | LabelledTwoViews | AugmentedView | UnlabelledView | EvalView


@pipeline_def(enable_conditionals=True)
def _pipeline(
    shards,
    index_paths,
    view: View,
    device,
    shard_id,
    num_shards,
    shuffle,
    shuffle_buffer,
    shuffle_seed,
    dtype,
    remote=None,
):
    if (
        remote is not None
    ):  # shards in object storage: samples from pipeline.remote (image, label, source bytes)
        read = fn.external_source(
            source=remote, num_outputs=remote.outputs, batch=True, dtype=types.UINT8, ndim=1
        )
        jpegs, sources = read[0], (read[2] if view.labelled else None)
    else:
        ext = [IMAGE_EXTENSIONS, "cls"] if view.labelled else [IMAGE_EXTENSIONS]
        read = _reader(
            shards, index_paths, ext, shard_id, num_shards, shuffle, shuffle_buffer, shuffle_seed
        )
        jpegs = read[0] if view.labelled else read
        sources = fn.get_property(jpegs, key="source_info") if view.labelled else None
    outputs = view.graph(jpegs, device, dtype)
    if not view.labelled:
        return outputs
    # Labels are ASCII digits of varying length: pad with zero bytes to a dense (batch, width) tensor; the
    # source (shard:offset:member) names a bad sample in errors.
    return *outputs, fn.pad(read[1], fill_value=0), fn.pad(sources, fill_value=0)


def _joined(parts: list[dict]) -> dict:
    """One batch from the pipelines' parts (one part per pipeline, concatenated along the batch)."""
    if len(parts) == 1:
        return parts[0]
    return {name: torch.cat(_same_width([part[name] for part in parts])) for name in parts[0]}


def _same_width(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zero-padded byte strings (labels, sources) of different widths padded to the widest."""
    width = max(t.shape[-1] for t in tensors)
    return [
        torch.nn.functional.pad(t, (0, width - t.shape[-1])) if t.shape[-1] != width else t
        for t in tensors
    ]


def _channels_last(nhwc: torch.Tensor) -> torch.Tensor:
    """A contiguous NHWC tensor viewed as NCHW: exactly torch's channels_last layout, no copy."""
    return nhwc.permute(0, 3, 1, 2)


def _source_names(padded: torch.Tensor) -> list[str]:
    return [bytes(row[row != 0].tolist()).decode(errors="replace") for row in padded.cpu()]


def describe_source(source_info: str) -> str:
    """DALI's ``shard.tar:offset:member`` -> ``shard shard.tar key KEY``."""
    match = re.fullmatch(r"(.*):(\d+):(.*)", source_info)
    if not match:
        return source_info
    shard, _, member = match.groups()
    return f"shard {shard} key {member.split('.', 1)[0]}"


def decode_labels(padded: torch.Tensor, source_info: torch.Tensor | None = None) -> torch.Tensor:
    """WebDataset ``.cls`` bytes (ASCII digits, zero-padded to a (B, W) uint8 tensor) -> int64 labels (B,).

    Surrounding whitespace is ignored; anything else that is not a digit raises, naming shard and key."""
    data = padded.to(torch.int64)
    whitespace = (data == 0) | (data == 32) | (data == 10) | (data == 13) | (data == 9)
    is_digit = (data >= 48) & (data <= 57)
    bad = ~(whitespace | is_digit).all(1) | ~is_digit.any(1)
    if bad.any():
        row = int(bad.nonzero()[0])
        where = (
            describe_source(_source_names(source_info[row : row + 1])[0])
            if source_info is not None
            else f"batch row {row}"
        )
        text = bytes(padded[row][padded[row] != 0].tolist())
        raise ShardError(f"{where}: label {text!r} is not a non-negative integer")
    labels = torch.zeros(data.shape[0], dtype=torch.int64)
    for column in range(data.shape[1]):
        digit = is_digit[:, column]
        labels = torch.where(digit, labels * 10 + (data[:, column] - 48), labels)
    return labels


def _subset_index(index: ShardIndex, keys: Collection[str]) -> ShardIndex:
    """The samples of ``index`` whose keys are in ``keys``, in shard order."""
    return ShardIndex(
        index.tar, [s for s in index.samples if sample_key(next(iter(s.values()))[2]) in keys]
    )


def check_labels(indexes: list[ShardIndex]) -> None:
    """Every sample has a ``.cls`` label; else a ``ShardError`` naming the shard and a key without one."""
    for index in indexes:
        unlabelled = [s for s in index.samples if "cls" not in s]
        if unlabelled:
            key = sample_key(next(iter(unlabelled[0].values()))[2])
            raise ShardError(
                f"shard {index.tar}: {len(unlabelled)} of {index.num_samples} samples have no label (.cls), "
                f"e.g. key {key} (it has {sorted(unlabelled[0])}); this loader needs labelled shards"
            )


class DaliLoader:
    """A DALI pipeline over WebDataset shards, sharded by rank, that makes ``view`` of each sample.

    Iterating gives one epoch of batches on the training device: ``(view1, view2)`` for ``TwoViews``,
    ``(images, labels)`` for ``AugmentedView``/``EvalView`` (images (N, 3, S, S) channels-last, labels
    int64 (N,)); ``len()`` is the number of batches per epoch. ``train=True``: shuffled, whole batches
    only, equal steps on every rank (a data set smaller than one batch per rank is an error for
    ``TwoViews``, and shrinks the batch for a labelled view: a 1% label subset can be smaller than the
    batch). ``train=False``: in shard order, every sample exactly once (see the module docstring).
    ``keys``: read only those samples. ``state_dict``/``load_state_dict``: resume at the exact batch."""

    def __init__(
        self,
        shards,
        batch_size: int,
        view: View,
        *,
        train: bool,
        device: str = "cpu",
        device_id: int | None = None,
        shard_id: int = 0,
        num_shards: int = 1,
        seed: int = 0,
        num_threads: int | None = None,
        prefetch: int = 2,
        shuffle_buffer: int = 4096,
        dtype: torch.dtype = torch.float32,
        keys: Collection[str] | None = None,
        pipelines: int | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        hw_decoder_load: float = 0.65,
        cache_bytes: int = 1 << 30,
        in_flight: int = 4,
    ):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if device == "gpu" and device_id is None:
            device_id = torch.cuda.current_device()
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} must be in [0, num_shards={num_shards})")
        if shuffle_buffer < 1:  # DALI's reader crashes the process (SIGSEGV) on initial_fill=0
            raise ValueError(f"shuffle_buffer must be >= 1 sample, got {shuffle_buffer}")
        self.view, self.train, self.shuffle_buffer, self.dtype = view, train, shuffle_buffer, dtype
        self.output_names = (
            [*view.outputs, "labels", "source"] if view.labelled else list(view.outputs)
        )
        self.remote, self.cache_bytes, self.in_flight = is_s3(shards), cache_bytes, in_flight
        self.max_image_pixels = max_image_pixels
        self._open_shards(shards)
        if view.labelled:
            check_labels(self.indexes)
        self.index_paths = {
            tar: index_path(tar) for tar in self.shards
        }  # what DALI reads; a subset's are filtered copies
        if keys is not None:
            self._restrict(keys)
        self.num_samples = sum(index.num_samples for index in self.indexes)
        if self.num_samples < num_shards:
            raise ShardError(f"{self.num_samples} samples cannot be split over {num_shards} ranks")
        # Each rank's part is read by ``pipelines`` DALI pipelines, each reading one contiguous sub-part and making
        # 1/pipelines of every batch; DALI's split into num_shards * pipelines parts refines its split into
        # num_shards parts, so a rank's sub-parts are exactly its part.
        pipelines = (pipelines or DEFAULT_PIPELINES) if train else 1
        if (
            batch_size % pipelines
            or self.num_samples // (num_shards * pipelines) < batch_size // pipelines
        ):
            pipelines = 1  # a batch that does not split evenly, or sub-parts smaller than their share of a batch
        self.pipelines = pipelines
        smallest_part = (
            self.num_samples // (num_shards * pipelines) * pipelines
        )  # parts differ by at most one sample
        if smallest_part < batch_size:
            if train and isinstance(view, TwoViews):  # pretraining: a batch is a batch
                raise ShardError(
                    f"{self.num_samples} samples over {num_shards} rank(s) do not fill one batch of "
                    f"{batch_size} per rank"
                )
            # smaller batches change nothing but speed (evaluation) or the lr scale (subsets)
            batch_size = smallest_part
        self.steps_per_epoch = (
            smallest_part // batch_size if train else None
        )  # whole batches of real samples on every rank (and from every sub-part)
        self.batch_size, self.device, self.device_id = batch_size, device, device_id
        self.shard_id, self.num_shards, self.seed = shard_id, num_shards, seed
        self.num_threads = num_threads or default_num_threads(
            device=device
        )  # over all of this rank's pipelines
        self.largest_image = (
            largest_image(self.indexes) if device == "gpu" and not self.remote else None
        )  # sizes nvJPEG's buffers
        self.prefetch, self.hw_decoder_load = prefetch, hw_decoder_load
        self.torch_device = (
            torch.device("cuda", device_id) if device == "gpu" else torch.device("cpu")
        )
        self.epoch = 0
        self._position = 0  # batches of this epoch handed out
        self._drained = False  # training: the rest of the reader's epoch consumed
        self._start_epoch = (
            0  # the epoch the current pipeline started in: its tar order and seeds come from it
        )
        self._iterator = self._make_iterator(self.epoch, checkpoints=None)

    def _open_shards(self, shards) -> None:
        """The shard list and indexes. A stale index or a decompression bomb never reaches DALI (whose native
        code would abort or stall on it): ``check_shard`` on every local shard now, on every remote shard's
        fetched bytes (``check_fetched``)."""
        if self.remote:  # s3://bucket/prefix/: streamed by pipeline.remote
            from .shards.s3 import remote_shard_set

            self.shards, self.indexes, self.shard_sizes = remote_shard_set(shards)
            # remote shards not yet checked, by their whole index (a subset's filtered copy would fail the check)
            self._unchecked: dict[str, ShardIndex] = dict(zip(self.shards, self.indexes))
        else:
            paths = shard_paths(shards)
            self.shards = paths
            self.indexes = [check_shard(read_index(tar), self.max_image_pixels) for tar in paths]

    def check_fetched(self, tar: str, data: bytes) -> None:
        """``check_shard`` on a remote shard's fetched bytes, the first time this process fetches it (as the local
        path checks each tar once, at start), against its whole index: pipeline.remote calls it before cutting any
        sample out, so a stale index or a decompression bomb in a bucket stops the run with the same
        ``ShardError`` naming the shard (exit 2, with a checkpoint of the last good step) before DALI sees it."""
        index = self._unchecked.get(tar)
        if index is not None:
            check_shard(index, self.max_image_pixels, io.BytesIO(data))
            self._unchecked.pop(tar, None)

    def _restrict(self, keys: Collection[str]) -> None:
        """Read only the samples whose keys are in ``keys`` (each must occur exactly once in the shards)."""
        keys = set(keys)
        seen: dict[str, Path] = {}
        for index in self.indexes:
            for sample in index.samples:
                key = sample_key(next(iter(sample.values()))[2])
                if key in keys and key in seen:
                    raise ShardError(
                        f"key {key} occurs in shard {seen[key]} and in shard {index.tar}: a subset "
                        "by key needs unique keys"
                    )
                seen.setdefault(key, index.tar)
        missing = sorted(keys - seen.keys())
        if missing:
            raise ShardError(
                f"{len(missing)} of the {len(keys)} requested keys are not in "
                f"{brace_notation(self.shards)}, e.g. {missing[:5]}"
            )
        kept = [(tar, _subset_index(index, keys)) for tar, index in zip(self.shards, self.indexes)]
        kept = [(tar, index) for tar, index in kept if index.num_samples]
        self.shards, self.indexes = [tar for tar, _ in kept], [index for _, index in kept]
        if self.remote:  # the stream reads by the (filtered) indexes in memory
            return
        self._subset_dir = tempfile.TemporaryDirectory(
            prefix="dali-subset-"
        )  # removed with the loader
        self.index_paths = {}
        for position, (tar, index) in enumerate(kept):
            self.index_paths[tar] = Path(self._subset_dir.name) / f"{position:06d}-{tar.stem}.idx"
            self.index_paths[tar].write_text(index.text())

    def _epoch_shards(self, epoch: int) -> list[Path]:
        """The shard order of a pipeline started at ``epoch`` (for later epochs DALI reshuffles it), identical on
        every rank."""
        if not self.train:
            return self.shards
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in order]

    def _make_iterator(self, epoch: int, checkpoints: list[bytes] | None) -> DALIGenericIterator:
        """The pipelines (started at ``epoch``, or restored from DALI ``checkpoints`` of pipelines started there)
        and their iterator. Random streams per (seed, start epoch, sub-part): shuffle buffer and augmentations;
        the tar order's seed per (seed, start epoch), shared by all ranks and pipelines."""
        self._start_epoch = epoch
        if self.remote:
            return self._make_remote_iterator(epoch)
        shuffle_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0] % 2**31)
        try:
            shards = self._epoch_shards(epoch)
            pipes = []
            for j in range(self.pipelines):
                sized = gpu_decoder_sized_for(
                    self.largest_image, self.hw_decoder_load
                )  # this pipeline's decoders
                part = self.shard_id * self.pipelines + j  # this pipeline's sub-part of the epoch
                seed = int(
                    np.random.SeedSequence([self.seed, epoch, part]).generate_state(1)[0] % 2**31
                )
                with sized:
                    pipe = _pipeline(
                        shards,
                        [self.index_paths[tar] for tar in shards],
                        self.view,
                        self.device,
                        part,
                        self.num_shards * self.pipelines,
                        self.train,
                        max(1, self.shuffle_buffer // self.pipelines),
                        shuffle_seed,
                        _DALI_DTYPES[self.dtype],
                        batch_size=self.batch_size // self.pipelines,
                        num_threads=max(1, self.num_threads // self.pipelines),
                        device_id=self.device_id if self.device == "gpu" else None,
                        seed=seed,
                        prefetch_queue_depth=self.prefetch,
                        enable_checkpointing=True,
                        checkpoint=checkpoints[j] if checkpoints else None,
                    )
                pipes.append(pipe)
            # A training loader takes every batch of the reader's epoch (PARTIAL), keeps the first
            # ``steps_per_epoch`` and drains the rest (see ``_batches``).
            return DALIGenericIterator(
                pipes,
                self.output_names,
                reader_name=READER,
                last_batch_policy=LastBatchPolicy.PARTIAL,
                auto_reset=True,
            )
        except RuntimeError as error:
            raise self._translate(error) from None

    def _make_remote_iterator(self, epoch: int) -> DALIGenericIterator:
        """Pipelines fed by ``pipeline.remote`` (one source per pipeline), from batch ``self._position`` of
        ``epoch``; augmentation seeds per (seed, epoch, sub-part, position)."""
        from .remote import ZippedIterators, remote_sources

        pipes, sources = [], remote_sources(self, epoch, self._position)
        for source in sources:
            seed = int(
                np.random.SeedSequence(
                    [self.seed, epoch, source.part, self._position]
                ).generate_state(1)[0]
            )
            with gpu_decoder_sized_for(None):
                pipes.append(
                    _pipeline(
                        *(
                            None,
                            None,
                            self.view,
                            self.device,
                            0,
                            1,
                            False,
                            1,
                            0,
                            _DALI_DTYPES[self.dtype],
                        ),
                        remote=source,
                        batch_size=self.batch_size // self.pipelines,
                        num_threads=max(1, self.num_threads // self.pipelines),
                        device_id=self.device_id if self.device == "gpu" else None,
                        seed=seed % 2**31,
                        prefetch_queue_depth=self.prefetch,
                    )
                )
        return ZippedIterators(
            [
                DALIGenericIterator(
                    [pipe],
                    self.output_names,
                    last_batch_policy=LastBatchPolicy.PARTIAL,
                    auto_reset=True,
                )
                for pipe in pipes
            ],
            sources,
        )

    def _translate(self, error: Exception) -> Exception:
        """Restate DALI's errors naming the shard and key at fault (DALI names the index line of a
        sample that lacks a component, and nothing for an image that fails to decode)."""
        text = str(error)
        reason = (
            text.split("encountered:", 1)[-1].strip().splitlines()[0]
            if "encountered:" in text
            else text.strip().splitlines()[0]
        )
        underfull = re.search(r'index file at "([^"]+\.idx)" line (\d+)', text)
        if underfull:
            idx, line = Path(underfull.group(1)), int(underfull.group(2))
            position = next(
                (i for i, t in enumerate(self.shards) if self.index_paths[t] == idx), None
            )
            index = (
                self.indexes[position]
                if position is not None
                else read_index(idx.with_suffix(".tar"))
            )
            tar = index.tar
            sample = index.samples[line - 1]  # DALI counts the header as line 0
            key = sample_key(next(iter(sample.values()))[2])
            return ShardError(
                f"shard {tar} key {key}: sample lacks a component this loader needs "
                f"(image: {IMAGE_EXTENSIONS.replace(';', '/')}"
                f"{', label: cls' if 'labels' in self.output_names else ''}); "
                f"it has {sorted(sample)}"
            )
        if "decoders.image" in text or "nvImageCodec" in text:
            return self._find_undecodable(reason)
        for tar in self.shards:
            if str(tar) in text:
                return ShardError(f"shard {tar}: {reason}")
        return error

    def _find_undecodable(self, reason: str) -> ShardError:
        """Name the image(s) behind a decoder failure: DALI's decoder over this rank's part of the epoch's
        samples (in this process: no fork beside live DALI threads), then the other ranks' parts."""
        by_tar = dict(zip(self.shards, self.indexes))
        in_order = [by_tar[tar] for tar in self._epoch_shards(self._start_epoch)]
        # This rank's part is known in the pipeline's first epoch; after DALI's own reshuffle, every part is read.
        problems = (
            find_undecodable(rank_part(in_order, self.shard_id, self.num_shards), self.num_threads)
            if self.epoch == self._start_epoch
            else []
        )
        if not problems and (self.num_shards > 1 or self.epoch != self._start_epoch):
            problems = find_undecodable(rank_part(in_order, 0, 1), self.num_threads)
        if problems:
            listed = "; ".join(problems[:5]) + (
                f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            )
            return ShardError(f"an image failed to decode ({reason}): {listed}")
        return ShardError(
            f"an image failed to decode ({reason}) but every image in {brace_notation(self.shards)} decodes "
            "when read directly: an index may be stale; rebuild with `simclr-shards index`"
        )

    def __len__(self) -> int:
        if self.remote and not self.train:  # an external source's iterator does not know its length
            return (
                -(-self.num_samples // self.num_shards // self.batch_size)
                if self.num_samples
                else 0
            )
        return self.steps_per_epoch if self.train else len(self._iterator)

    def _batches(self):
        """One epoch of DALI output dicts; then the loader moves to the next epoch."""
        try:
            if self.train:
                while self._position < self.steps_per_epoch:
                    batch = next(self._iterator)
                    self._position += 1
                    yield _joined(batch)
                self._drain()
            else:
                for batch in self._iterator:
                    self._position += 1
                    yield _joined(batch)
        except RuntimeError as error:
            raise self._translate(error) from None
        self.epoch += 1
        self._position, self._drained = 0, False

    def _drain(self) -> None:
        """Consume the rest of the reader's epoch (remainder + padding): the next epoch starts aligned on every rank."""
        while not self._drained:
            try:
                next(self._iterator)  # not ``for``: DALI's __iter__ warns about a reset mid-epoch
            except StopIteration:  # which also resets the iterator for the next epoch
                self._drained = True

    def state_dict(self) -> dict:
        """Epoch, reader position and augmentation RNG state: restoring continues with exactly the next batch."""
        state = {"shard_id": self.shard_id, "num_shards": self.num_shards}
        epoch, position = self.epoch, self._position
        if (
            self.train and self._position >= self.steps_per_epoch
        ):  # the epoch is used up: state at the next one's start
            try:  # a remote stream needs no drain (it restarts from (epoch, position)), and must not fetch here:
                if (
                    not self.remote
                ):  # a store fault belongs to the next batch, not to the checkpoint
                    self._drain()
            except RuntimeError as error:
                raise self._translate(error) from None
            epoch, position = self.epoch + 1, 0
        checkpoints = (
            [  # DALI's serialised protobufs, one per pipeline: bytes, base64 for JSON
                base64.b64encode(c if isinstance(c, bytes) else c.encode()).decode()
                for c in self._iterator.checkpoints()
            ]
            if not self.remote
            else []
        )  # a remote stream restarts from (epoch, position): pipeline.remote
        return {
            **state,
            "epoch": epoch,
            "position": position,
            "pipeline_epoch": self._start_epoch,
            "dali_checkpoint": checkpoints,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s state; ``dali_checkpoint: None`` starts ``epoch`` afresh (a new
        pipeline, its tar order from (seed, epoch))."""
        if (state["shard_id"], state["num_shards"]) != (self.shard_id, self.num_shards):
            raise ValueError(
                f"loader state is for rank {state['shard_id']} of {state['num_shards']}, "
                f"this loader is rank {self.shard_id} of {self.num_shards}"
            )
        checkpoints = state["dali_checkpoint"]
        checkpoints = (
            [checkpoints] if isinstance(checkpoints, str) else checkpoints
        )  # one pipeline (older states)
        if checkpoints and len(checkpoints) != self.pipelines:
            self._adopt_pipelines(len(checkpoints))
        self._release_iterator()
        self.epoch, self._position, self._drained = state["epoch"], state.get("position", 0), False
        start = state.get("pipeline_epoch", self.epoch) if checkpoints else self.epoch
        self._iterator = self._make_iterator(
            start, checkpoints=[base64.b64decode(c) for c in checkpoints] if checkpoints else None
        )

    def close(self) -> None:
        """Shut this loader's DALI pipelines down now (idempotent; the loader cannot be iterated afterwards).

        DALI's pipeline objects sit in reference cycles, so without this their native threads and buffers go only
        when Python's cycle collector next runs (measured on the CPU backend: 6 threads of a tiny training run
        left behind, and its heap kept growing over a test session that trained in-process many times)."""
        self._release_iterator()
        self._iterator = None

    def _release_iterator(self) -> None:
        iterator = getattr(self, "_iterator", None)
        if iterator is None:
            return
        if self.remote:
            iterator.close()  # its producer threads
        for inner in getattr(
            iterator, "iterators", [iterator]
        ):  # ZippedIterators holds one iterator a pipeline
            for pipe in getattr(inner, "_pipes", []):
                pipe._shutdown()  # DALI's own release (Pipeline.__del__ and its atexit hook call it)
        self._iterator = None

    def _adopt_pipelines(self, count: int) -> None:
        """Run ``count`` pipelines per rank, as the checkpoint being resumed did (a run from before the default
        changed): the same sub-parts and seeds, so the resume is exact, where the steps per epoch stay the same."""
        smallest_part = self.num_samples // (self.num_shards * count) * count
        if (
            not self.train
            or self.batch_size % count
            or smallest_part // self.batch_size != self.steps_per_epoch
        ):
            raise ValueError(
                f"loader state holds {count} DALI pipeline checkpoint(s), this loader runs {self.pipelines} "
                "pipeline(s) per rank and cannot take that many: resume with the same pipelines and batch size"
            )
        self.pipelines = count

    def __iter__(self):
        if self._iterator is None:
            raise RuntimeError("this DaliLoader was closed")
        for batch in self._batches():
            if self.view.labelled:
                labels = decode_labels(batch["labels"].cpu(), batch["source"])
                images = (_channels_last(batch[name]) for name in self.view.outputs)
                yield *images, labels.to(self.torch_device, non_blocking=True)
            else:
                yield tuple(_channels_last(batch[name]) for name in self.view.outputs)


def classifier_augment(
    size: int, crop_area: tuple[float, float] = (0.08, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> AugmentConfig:
    """The augmentation of the paper's linear evaluation and fine-tuning: random resized crop + flip only."""
    return AugmentConfig(
        size=size,
        crop_area=crop_area,
        jitter_prob=0.0,
        gray_prob=0.0,
        blur_prob=0.0,
        mean=mean,
        std=std,
    )

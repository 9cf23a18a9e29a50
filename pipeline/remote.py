"""Training and evaluation straight from shards in object storage (``s3://bucket/prefix/``), at local-disk speed.

Why not DALI's own reader: DALI 2.4's webdataset reader takes ``s3://`` paths but fetches member by member (one
request per image): 100x slower than local disk on a server on 127.0.0.1, worse over a real network. And it opens
every shard when the pipeline starts, so it cannot read from a bounded local cache either.

What happens instead: each shard is fetched whole (one GET, several in flight, ahead of need) by a
``ShardPrefetcher`` that holds at most ``cache_bytes`` of shards in memory; a ``SampleStream`` cuts the samples out
of each shard by its index (no tar parsing), shuffles them within a buffer of ``shuffle_buffer`` samples and hands
them to DALI's ``external_source``, which feeds the same decode + view graph as the reader does. Memory used:
``cache_bytes`` of shards + the shuffle buffer's samples (``shuffle_buffer`` x the mean sample size).

Checks: each shard's fetched bytes pass the local loader's gate (``shardset.check_shard``: the index matches the
tar, no image over the pixel cap) before any sample is cut out of them, the first time the process fetches that
shard; a stale, shorter, longer or foreign ``.idx`` or a decompression bomb in a bucket is a ``ShardError`` naming
the shard's URL, as for a local shard (raised where the stream reaches that shard, not at loader start: checking
before would cost a GET per image).

Epochs (the same rules as the local loader, ``pipeline.loader``): each epoch the shard order is the permutation of
(seed, epoch) (every epoch, where DALI reshuffles after the first), the samples split into contiguous parts per rank
(and per pipeline) as DALI splits them, each part shuffled in a buffer with an RNG of (seed, epoch, part); training
takes ``steps_per_epoch`` whole batches of every part, evaluation every sample once. The whole order of an epoch is
a function of (seed, epoch, part): a resume at batch k regenerates it, fetches only the shards that hold samples not
yet seen, and continues with exactly the samples an uninterrupted run would have seen next (the augmentations'
random draws after a resume differ: they are seeded by (seed, epoch, part, position)).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .shards.s3 import ObjectPath, ObjectStoreError, get_bytes
from .shards.shardset import IMAGE_COMPONENTS, ShardIndex

DEFAULT_CACHE_BYTES = 1 << 30  # memory for fetched shards, per rank (split between its pipelines)
DEFAULT_IN_FLIGHT = 4  # concurrent whole-shard GETs


class ShardPrefetcher:
    """Fetches ``plan``'s shards (url, size) in order, ``in_flight`` at a time, while the bytes it holds (fetched or
    being fetched, not yet released) stay within ``bound``. ``take(i)`` waits for shard i; ``release(i)`` frees it.
    ``peak_bytes`` is the most it ever held (a test checks it against the bound)."""

    def __init__(
        self,
        plan: Sequence[tuple[ObjectPath, int]],
        bound: int,
        in_flight: int = DEFAULT_IN_FLIGHT,
        fetch: Callable[[ObjectPath], bytes] = get_bytes,
    ):
        too_big = [(url, size) for url, size in plan if size > bound]
        if too_big:
            raise ObjectStoreError(
                f"shard {too_big[0][0]} ({too_big[0][1]} bytes) is larger than the shard cache "
                f"({bound} bytes): raise cache_bytes or write smaller shards (simclr-shards write --max_bytes)"
            )
        self.plan, self.bound, self.in_flight, self.fetch = list(plan), bound, in_flight, fetch
        self.held = self.peak_bytes = self.running = self.next = 0
        self.results: dict[int, bytes | BaseException] = {}
        self.cond = threading.Condition()
        self.pool = ThreadPoolExecutor(in_flight, thread_name_prefix="shard-fetch")
        with self.cond:
            self._schedule()

    def _schedule(self) -> None:  # under self.cond
        while self.next < len(self.plan) and self.running < self.in_flight:
            size = self.plan[self.next][1]
            if self.held + size > self.bound:
                return
            self.held += size
            self.peak_bytes = max(self.peak_bytes, self.held)
            self.running += 1
            self.pool.submit(self._fetch, self.next)
            self.next += 1

    def _fetch(self, i: int) -> None:
        url, size = self.plan[i]
        try:
            data: bytes | BaseException = self.fetch(url)
            if len(data) != size:
                data = ObjectStoreError(
                    f"shard {url} changed while reading: {len(data)} bytes, its listing said {size}; "
                    "do not rewrite a set while it is being read"
                )
        except BaseException as error:  # handed to the consumer by take()
            data = error
        with self.cond:
            self.results[i] = data
            self.running -= 1
            self._schedule()
            self.cond.notify_all()

    def take(self, i: int) -> bytes:
        with self.cond:
            self.cond.wait_for(lambda: i in self.results)
            data = self.results[i]
        if isinstance(data, BaseException):
            raise data
        return data

    def release(self, i: int) -> None:
        with self.cond:
            self.results.pop(i, None)
            self.held -= self.plan[i][1]
            self._schedule()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def buffer_shuffle(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The output order of ``range(n)`` through a shuffle buffer of ``buffer`` items (like DALI's reader: fill the
    buffer, then output a random item and put the next input in its place). A pure function of its arguments."""
    out = np.empty(n, dtype=np.int64)
    held = list(range(min(buffer, n)))
    upcoming = len(held)
    picks = rng.random(n)
    for t in range(n):
        j = int(picks[t] * len(held))
        out[t] = held[j]
        if upcoming < n:
            held[j] = upcoming
            upcoming += 1
        else:
            held[j] = held[-1]
            held.pop()
    return out


def part_range(num_samples: int, part: int, num_parts: int) -> tuple[int, int]:
    """DALI's split of ``num_samples`` into ``num_parts`` contiguous parts (sizes differ by at most one)."""
    return num_samples * part // num_parts, num_samples * (part + 1) // num_parts


class SampleStream:
    """One epoch of one part: (image, label, source) byte arrays in the epoch's order, from ``skip`` on.

    ``order`` lists global positions (in the epoch's concatenation of ``indexes``); a position's sample is copied out
    of its shard when the stream first reaches the shard holding it (each needed shard fetched once, in order), and
    handed out when its turn comes."""

    def __init__(
        self,
        indexes: Sequence[ShardIndex],
        order: np.ndarray,
        skip: int,
        cache_bytes: int,
        in_flight: int,
        shard_sizes: Sequence[int],
        outputs: int = 3,
        check: Callable[[str, bytes], None] | None = None,
    ):
        self.indexes, self.order, self.at, self.outputs = indexes, order.tolist(), skip, outputs
        self.check = check  # called on each fetched shard before any sample is cut out (DaliLoader.check_fetched)
        self.starts = np.cumsum([0] + [index.num_samples for index in indexes])
        wanted = np.asarray(order[skip:], dtype=np.int64)
        shard_of = np.searchsorted(self.starts, wanted, side="right") - 1
        self.needed = sorted(
            set(shard_of.tolist())
        )  # shards holding a sample still to come, in load order
        self.wanted = set(wanted.tolist())
        self.buffered: dict[int, tuple[np.ndarray, ...]] = {}
        self.next_shard = 0  # position in self.needed
        plan = [(ObjectPath(indexes[s].tar), shard_sizes[s]) for s in self.needed]
        self.prefetcher = ShardPrefetcher(plan, cache_bytes, in_flight) if plan else None

    def _load_next_shard(self) -> None:
        """Copy every still-wanted sample of the next needed shard into the buffer, then free the shard."""
        i = self.next_shard
        shard = self.needed[i]
        raw = self.prefetcher.take(i)
        index, first = self.indexes[shard], int(self.starts[shard])
        if self.check is not None:
            self.check(index.tar, raw)
        data = np.frombuffer(raw, dtype=np.uint8)
        del raw
        for j, sample in enumerate(index.samples):
            if first + j in self.wanted:  # not: seen before a resume, or another part's
                self.buffered[first + j] = sample_arrays(data, sample, index.tar, self.outputs)
        del data
        self.prefetcher.release(i)
        self.next_shard += 1

    def take(self, count: int) -> list[tuple[np.ndarray, ...]]:
        """The next ``count`` samples (fewer at the end of the order)."""
        out = []
        for q in self.order[self.at : self.at + count]:
            while q not in self.buffered:
                self._load_next_shard()
            out.append(self.buffered.pop(q))
        self.at += len(out)
        return out

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()


def sample_arrays(data: np.ndarray, sample: dict, tar, outputs: int = 3) -> tuple[np.ndarray, ...]:
    """The first ``outputs`` of (image bytes, label bytes, 'shard:offset:member') of one sample, as uint8 arrays
    (copies: the shard's bytes are freed once its samples are taken)."""
    image = next((ext for ext in sample if ext.lower() in IMAGE_COMPONENTS), None)
    if image is None:
        raise ObjectStoreError(
            f"shard {tar}: a sample has no image member (it has {sorted(sample)})"
        )
    offset, size, name = sample[image]
    if outputs == 1:
        return (data[offset : offset + size].copy(),)
    label = sample.get("cls")
    return (
        data[offset : offset + size].copy(),
        data[label[0] : label[0] + label[1]].copy() if label else np.zeros(0, np.uint8),
        np.frombuffer(f"{tar}:{offset}:{name}".encode(), dtype=np.uint8).copy(),
    )


class RemoteSource:
    """DALI ``external_source`` callable for one pipeline: batches of ``batch_size`` samples of part ``part``, epoch
    after epoch; raises StopIteration at each epoch's end (``batches_per_epoch`` whole batches when training, every
    sample when evaluating). ``outputs``: 1 (images) or 3 (images, labels, sources).

    A producer thread cuts the batches ahead of DALI (``READY_BATCHES`` of them, across epoch ends too), so that the
    callback, which DALI runs on the training thread, only hands one over."""

    READY_BATCHES = 3
    END = object()  # an epoch's end in the queue

    def __init__(self, loader, part: int, num_parts: int, epoch: int, position: int, outputs: int):
        self.loader, self.part, self.num_parts, self.outputs = loader, part, num_parts, outputs
        self.batch_size = loader.batch_size // loader.pipelines
        self.epoch, self.skip = epoch, position * self.batch_size
        self.ready: queue.Queue = queue.Queue(self.READY_BATCHES)
        self.stopped = threading.Event()
        self.producer = threading.Thread(
            target=self._produce, name=f"remote-part-{part}", daemon=True
        )
        self.producer.start()

    def _open(self, epoch: int, skip: int) -> SampleStream:
        loader = self.loader
        shards = loader._epoch_shards(epoch)
        by_tar = dict(zip(loader.shards, loader.indexes))
        indexes = [by_tar[tar] for tar in shards]
        total = sum(index.num_samples for index in indexes)
        lo, hi = part_range(total, self.part, self.num_parts)
        if loader.train:
            rng = np.random.default_rng([loader.seed, epoch, self.part])
            order = lo + buffer_shuffle(
                hi - lo, max(1, loader.shuffle_buffer // loader.pipelines), rng
            )
            order = order[: loader.steps_per_epoch * self.batch_size]
        else:
            order = np.arange(lo, hi)
        sizes = [loader.shard_sizes[tar] for tar in shards]
        cache = loader.cache_bytes // loader.pipelines
        return SampleStream(
            indexes, order, skip, cache, loader.in_flight, sizes, self.outputs, loader.check_fetched
        )

    def _put(self, item) -> bool:
        """Queue ``item`` unless stopped; False once stopped."""
        while not self.stopped.is_set():
            try:
                self.ready.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        epoch, skip = self.epoch, self.skip
        while not self.stopped.is_set():
            stream = None
            try:
                stream = self._open(epoch, skip)
                while samples := stream.take(self.batch_size):
                    if not self._put(
                        tuple([sample[k] for sample in samples] for k in range(self.outputs))
                    ):
                        return
            except BaseException as error:  # raised on the training thread by __call__
                self._put(error)
                return
            finally:
                if stream is not None:
                    stream.close()
            if not self._put(self.END):
                return
            epoch, skip = epoch + 1, 0

    def __call__(self):
        item = self.ready.get()
        if item is self.END:
            self.epoch += 1
            raise StopIteration
        if isinstance(item, BaseException):
            self.ready.put(item)  # every later call fails the same way
            raise item
        return item

    def close(self) -> None:
        self.stopped.set()


def remote_sources(loader, epoch: int, position: int) -> list[RemoteSource]:
    """One source per pipeline of ``loader`` (a ``DaliLoader`` over remote shards), starting at batch ``position``
    of ``epoch``."""
    outputs = 3 if loader.view.labelled else 1
    parts = loader.num_shards * loader.pipelines
    return [
        RemoteSource(
            loader, loader.shard_id * loader.pipelines + j, parts, epoch, position, outputs
        )
        for j in range(loader.pipelines)
    ]


class ZippedIterators:
    """One DALI iterator per pipeline, stepped together: each ``next`` is the list of the pipelines' parts of a
    batch (what ``DALIGenericIterator`` over several pipelines gives, which needs a reader to know its epoch's end:
    an external source ends it by StopIteration, and every pipeline's source ends at the same batch)."""

    def __init__(self, iterators: list, sources: list[RemoteSource]):
        self.iterators, self.sources = iterators, sources

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def __del__(self):
        self.close()

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        parts, stopped = [], 0
        for iterator in self.iterators:
            try:
                parts += next(iterator)
            except StopIteration:
                stopped += 1
        if stopped:
            if stopped != len(self.iterators):
                raise RuntimeError(
                    f"remote pipelines out of step: {stopped} of {len(self.iterators)} ended an epoch"
                )
            raise StopIteration
        return parts

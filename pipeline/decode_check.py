"""Find the images DALI cannot decode, with DALI's own decoder, in the samples one rank reads.

A DALI pipeline that meets an undecodable image fails without naming it. ``rank_part`` lists the samples a
rank's reader is given (DALI's webdataset reader splits the concatenated samples of its shard list into
``num_shards`` contiguous parts), and ``find_undecodable`` decodes them with DALI's dynamic (eager) API in
this process, batch by batch on DALI's thread pool, and one by one where a batch fails. No process is
forked: the caller has live DALI threads (the deadlock the shard writer avoids with spawn)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .shards.shardset import IMAGE_COMPONENTS, ShardIndex, sample_key


def rank_part(
    indexes: list[ShardIndex], shard_id: int, num_shards: int
) -> list[tuple[Path, str, int, int]]:
    """(tar, key, offset, size) of the image of every sample rank ``shard_id`` reads from ``indexes`` (in
    the reader's shard order), as DALI splits them: samples [N*i // n, N*(i+1) // n)."""
    samples = []
    for index in indexes:
        for sample in index.samples:
            ext = next(
                (e for e in IMAGE_COMPONENTS for found in sample if found.lower() == e), None
            )
            image = (
                next((sample[found] for found in sample if found.lower() == ext), None)
                if ext
                else None
            )
            if image is not None:
                samples.append((index.tar, sample_key(image[2]), image[0], image[1]))
    total = len(samples)
    return samples[total * shard_id // num_shards : total * (shard_id + 1) // num_shards]


def find_undecodable(
    samples: list[tuple[Path, str, int, int]], num_threads: int = 1, batch_size: int = 64
) -> list[str]:
    """One "shard TAR key KEY: reason" line per image of ``samples`` that DALI's CPU decoder rejects."""
    import nvidia.dali.experimental.dynamic as ndd

    def decodes(encoded: list[np.ndarray]) -> str | None:
        try:
            ndd.decoders.image(ndd.batch(encoded), device="cpu").evaluate()
            return None
        except RuntimeError as error:
            detail = str(
                error.__cause__ or error
            ).strip()  # DALI's reason is the cause of its generic error
            return detail.splitlines()[0].rstrip(" :") if detail else type(error).__name__

    problems, handles = [], {}
    try:
        with ndd.EvalContext(num_threads=max(1, num_threads), device_id=None):
            for start in range(0, len(samples), batch_size):
                chunk = samples[start : start + batch_size]
                encoded = []
                for tar, _, offset, size in chunk:
                    handle = handles.get(tar) or handles.setdefault(tar, open(tar, "rb"))
                    handle.seek(offset)
                    encoded.append(np.frombuffer(handle.read(size), dtype=np.uint8))
                if decodes(encoded) is None:
                    continue
                for (tar, key, _, size), data in zip(chunk, encoded):
                    reason = "empty" if size == 0 else decodes([data])
                    if reason is not None:
                        problems.append(
                            f"shard {tar} key {key}: image does not decode with DALI ({reason})"
                        )
    finally:
        for handle in handles.values():
            handle.close()
    return problems

"""Worker for tests/test_s3.py (run under torchrun, gloo): each rank trains its loader over the local shards and
over the same shards in a bucket for 2 epochs; rank 0 writes every rank's sample ids per epoch to a JSON file.
Arguments: LOCAL_DIR S3_URL OUT_JSON."""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from simclr_dali.pipeline.loader import AugmentedView, DaliLoader, classifier_augment


def rank_ids(location: str, rank: int, world: int) -> list[list[int]]:
    view = AugmentedView(classifier_augment(16))
    loader = DaliLoader(
        location, 8, view, train=True, seed=5, shuffle_buffer=16, shard_id=rank, num_shards=world
    )
    try:
        return [[i for _, labels in loader for i in labels.tolist()] for _ in range(2)]
    finally:
        loader.close()


def main(local: str, url: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {"local": rank_ids(local, rank, world), "s3": rank_ids(url, rank, world)}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(everyone, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])

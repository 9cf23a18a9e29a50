"""The small collectives every rank takes part in to decide together: whether to stop, which checkpoint to
resume, whether a write or a load failed somewhere.

They run on a gloo group (host memory): a per-step flag exchange never waits on the GPU's queue, and JSON
payloads travel as bytes (no pickle, unlike ``broadcast_object_list``). With one process they are no-ops."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
import torch.distributed as dist


class RankConsensus:
    """What every rank agrees on: flags ORed over ranks, rank 0's choice, every rank's report."""

    def __init__(self, world_size: int, rank: int):
        self.world_size, self.rank = world_size, rank
        self.group = None
        if world_size > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(
                backend="gloo"
            )  # collective: every rank creates it, in the same order

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of every rank's ``flags`` (one tiny all-reduce)."""
        values = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(v) for v in values.tolist()]

    def agree(self, **flags: bool) -> SimpleNamespace:
        """Each named flag ORed over every rank, by name (``agree(preempted=...).preempted``): one all-reduce."""
        return SimpleNamespace(**dict(zip(flags, self.any(list(flags.values())))))

    def broadcast_json(self, value):
        """Rank 0's ``value`` (JSON data) on every rank."""
        if self.world_size == 1:
            return value
        data = json.dumps(value).encode() if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(size, 0, group=self.group)
        buffer = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if self.is_main
            else torch.empty(int(size), dtype=torch.uint8)
        )
        dist.broadcast(buffer, 0, group=self.group)
        return json.loads(bytes(buffer.tolist()).decode()) if not self.is_main else value

    def all_gather_json(self, value) -> list:
        """Every rank's ``value`` (JSON data), in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        data = json.dumps(value).encode()
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self.group)
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: len(data)] = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else padded[:0]
        )
        buffers = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(buffers, padded, group=self.group)
        return [json.loads(bytes(b[: int(s)].tolist()).decode()) for b, s in zip(buffers, sizes)]

    def first_error(self, error: str | None) -> str | None:
        """None when no rank had an error, else the first failing rank's message (on every rank)."""
        failed = self.any([error is not None])[0]
        if not failed:
            return None
        errors = self.all_gather_json(error)
        return next(
            f"{e}" if self.world_size == 1 else f"rank {r}: {e}"
            for r, e in enumerate(errors)
            if e is not None
        )

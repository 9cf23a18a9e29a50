"""The marks a profiled training step leaves and what is computed from them, for ``bench.py profile``: clock marks
at the edges of the top-level ``record_function`` stages (``StageRecorder``) and of each DDP gradient bucket's
all-reduce (``AllReduceRecorder``), the per-stage table they resolve to (``stage_table``), and the GPU
utilisation read off a torch.profiler trace (``gpu_utilisation``).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
from torch.autograd.profiler import record_function

CANONICAL_STAGES = ("data wait", "forward", "loss", "backward", "optimizer")
TRANSPARENT_RANGES = ("ProfilerStep#",)  # the profiler's own per-step range encloses the stages


class StageRecorder:
    """Clock marks at the edges of every top-level ``record_function`` range that the training thread opens
    while the recorder is active (a context manager), grouped by ``begin_step()``.

    ``steps`` after the window: one list per step of ``(name, start_mark, end_mark)``."""

    def __init__(self, clock):
        self.clock = clock
        self.steps: list[list[tuple]] = []
        self._thread = threading.get_ident()
        self._depth = 0
        self._saved = None

    def begin_step(self) -> None:
        self.steps.append([])

    def _enter(self, rf) -> None:
        tracked = threading.get_ident() == self._thread and not rf.name.startswith(
            TRANSPARENT_RANGES
        )
        rf._stage_tracked = tracked
        if tracked:
            self._depth += 1
            if self._depth == 1:
                rf._stage_start = self.clock.mark()

    def _exit(self, rf) -> None:
        if not getattr(rf, "_stage_tracked", False):
            return
        if self._depth == 1 and self.steps:
            self.steps[-1].append((rf.name, rf._stage_start, self.clock.mark()))
        self._depth -= 1

    def __enter__(self):
        enter, exit_ = record_function.__enter__, record_function.__exit__
        recorder = self

        def traced_enter(rf):
            result = enter(rf)
            recorder._enter(rf)
            return result

        def traced_exit(rf, *exc):
            recorder._exit(rf)
            return exit_(rf, *exc)

        self._saved = (enter, exit_)
        record_function.__enter__, record_function.__exit__ = traced_enter, traced_exit
        return self

    def __exit__(self, *exc):
        record_function.__enter__, record_function.__exit__ = self._saved
        return False


class AllReduceRecorder:
    """A DDP comm hook: DDP's default all-reduce of each gradient bucket, with clock marks at its launch
    (the bucket's gradients are ready) and its completion. ``steps``: per step, ``(launch, done)`` marks."""

    def __init__(self, clock):
        self.clock = clock
        self.steps: list[list[tuple]] = []
        self.active = False

    def begin_step(self) -> None:
        self.steps.append([])

    def hook(self, process_group, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        if not (self.active and self.steps):
            return default_hooks.allreduce_hook(process_group, bucket)
        intervals, launched = self.steps[-1], self.clock.mark()
        with record_function(f"all-reduce (bucket {bucket.index()})"):
            future = default_hooks.allreduce_hook(process_group, bucket)

        def done(fut):
            intervals.append(
                (launched, self.clock.mark())
            )  # on CUDA: ordered after the collective's kernels
            return fut.value()

        return future.then(done)


# --------------------------------------------------------------------------- arithmetic on the marks


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else 0.0


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by a set of (start, end) intervals."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def stage_order(names: list[str]) -> list[str]:
    """Canonical stages first (in their order), then the others in order of first appearance."""
    seen = list(dict.fromkeys(names))
    return [n for n in CANONICAL_STAGES if n in seen] + [
        n for n in seen if n not in CANONICAL_STAGES
    ]


def stage_table(
    stage_steps: list[list[tuple[str, float, float]]],
    step_seconds: list[float],
    allreduce_steps: list[list[tuple[float, float]]] | None = None,
) -> dict:
    """The per-stage table from resolved times (seconds on one clock).

    stage_steps: per step, ``(name, start, end)`` of each top-level range; step_seconds: the independently
    clocked length of each step; allreduce_steps: per step, ``(launch, done)`` of each bucket (DDP only).
    Returns ``{"stages": [{name, mean_ms, p90_ms, share, per_step}], "step": {...}, "unattributed": {...},
    "allreduce": {...} | None, "attributed_share": float}``."""
    if len(stage_steps) != len(step_seconds):
        raise ValueError(
            f"{len(stage_steps)} steps of stage marks but {len(step_seconds)} clocked steps"
        )
    names = stage_order([name for step in stage_steps for name, _, _ in step])
    per_step = {name: [0.0] * len(step_seconds) for name in names}
    counts = {name: 0 for name in names}
    for i, step in enumerate(stage_steps):
        for name, start, end in step:
            per_step[name][i] += end - start
            counts[name] += 1
    mean_step = float(np.mean(step_seconds)) if step_seconds else 0.0

    def row(name, values, **extra):
        mean = float(np.mean(values)) if values else 0.0
        return {
            "name": name,
            "mean_ms": 1000 * mean,
            "p90_ms": 1000 * percentile(values, 90),
            "share": mean / mean_step if mean_step else 0.0,
            **extra,
        }

    stages = [
        row(name, per_step[name], ranges_per_step=counts[name] / max(1, len(step_seconds)))
        for name in names
    ]
    attributed = [sum(per_step[name][i] for name in names) for i in range(len(step_seconds))]
    unattributed = [step - covered for step, covered in zip(step_seconds, attributed)]
    table = {
        "stages": stages,
        "unattributed": row("unattributed", unattributed),
        "step": row("step (independent clock)", list(step_seconds)),
        "attributed_share": float(np.sum(attributed) / np.sum(step_seconds))
        if np.sum(step_seconds)
        else 0.0,
        "allreduce": None,
    }
    if allreduce_steps is not None:
        in_flight, exposed, buckets = [], [], []
        for step, intervals in zip(stage_steps, allreduce_steps):
            in_flight.append(union_length(intervals))
            buckets.append(len(intervals))
            if not intervals:
                exposed.append(0.0)
                continue
            last_launch = max(launch for launch, _ in intervals)
            stage_end = next(
                (end for _, start, end in step if start <= last_launch <= end), last_launch
            )
            exposed.append(
                union_length(
                    [
                        (last_launch, min(done, stage_end))
                        for launch, done in intervals
                        if min(done, stage_end) > last_launch
                    ]
                )
            )
        table["allreduce"] = {
            "in_flight": row("all-reduce in flight (overlaps backward)", in_flight),
            "exposed": row("all-reduce exposed (after the last bucket's launch)", exposed),
            "buckets_per_step": float(np.mean(buckets)) if buckets else 0.0,
        }
    return table


def resolve(clock, reference, marks):
    """Seconds from ``reference`` to each mark (marks nested in tuples/lists keep their shape)."""
    if isinstance(marks, list):
        return [resolve(clock, reference, m) for m in marks]
    if isinstance(marks, tuple):
        return tuple(m if isinstance(m, str) else resolve(clock, reference, m) for m in marks)
    return clock.seconds(reference, marks)


# --------------------------------------------------------------------------- the trace


def read_trace(path: str | Path) -> list[dict]:
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        data = json.load(handle)
    return data["traceEvents"] if isinstance(data, dict) else data


def gpu_utilisation(events: list[dict]) -> dict | None:
    """Busy kernel time / wall time over the profiled steps, from a Chrome-format torch.profiler trace.

    Wall time: from the first ``ProfilerStep#`` range's start to the last one's end (host timestamps, which
    the profiler aligns with the device's; the window's last edge is synchronised). Busy: the union of all
    kernels' intervals (any stream) within it; memcpy/memset counted separately. None without kernels (CPU)."""
    steps = [
        e
        for e in events
        if e.get("ph") == "X"
        and str(e.get("name", "")).startswith("ProfilerStep#")
        and e.get("cat") != "gpu_user_annotation"
    ]
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]
    if not kernels or not steps:
        return None
    start = min(float(e["ts"]) for e in steps)
    end = max(float(e["ts"]) + float(e.get("dur", 0)) for e in steps)

    def busy(selected):
        clipped = [
            (max(start, float(e["ts"])), min(end, float(e["ts"]) + float(e.get("dur", 0))))
            for e in selected
        ]
        return union_length([(a, b) for a, b in clipped if b > a])

    copies = [
        e for e in events if e.get("ph") == "X" and e.get("cat") in ("gpu_memcpy", "gpu_memset")
    ]
    wall = end - start
    return {
        "kernel_busy_fraction": busy(kernels) / wall if wall else 0.0,
        "kernel_or_copy_busy_fraction": busy(kernels + copies) / wall if wall else 0.0,
        "window_ms": wall / 1000,
        "kernels": len(kernels),
    }

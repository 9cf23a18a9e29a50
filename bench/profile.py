"""`bench.py profile`: where a training step's time goes, on your config and your shards.

    python bench.py profile --config configs/cifar10_cpu.yaml                 # any train.py flags may follow
    torchrun --nproc_per_node 2 bench.py profile --config configs/demo.yaml   # one table per rank

Runs train.py's own step (``trainer.step.train_step``, fed by ``trainer.data.build_train_loader``) for
``--warmup_steps`` steps, then ``--profile_steps`` steps under ``torch.profiler``, and writes
- a trace per rank, ``TRACE_DIR/rank<r>.pt.trace.json.gz`` (open it in https://ui.perfetto.dev or
  chrome://tracing; TensorBoard's profiler plugin reads TRACE_DIR): the loop's "data wait", the stages
  ``train_step`` marks with ``record_function`` (forward, loss, backward, optimizer, or whatever ranges it
  has), the DDP gradient all-reduce per bucket, every operator and, on CUDA, every kernel;
- a stage table (printed, and in the JSON): each stage's time per step (mean and p90 over the profiled
  steps) and share of the step, against an independently clocked whole step (``trainer.meters.StepTimer``,
  its own marks), with the difference as an explicit "unattributed" line; images/s, the data-wait
  fraction, peak memory and, on CUDA, GPU utilisation read off the trace (busy kernel time / wall time);
- the pipeline alone: the same loader (same shards, batch and threads) drained without training, for
  ``--pipeline_seconds``: its images/s is the ceiling the step's demand is compared with in the verdict.

Clocks: every stage edge and step edge is a mark of ``trainer.meters.device_clock``: the host clock on the
CPU, CUDA events on a GPU (device time, read once after the window; the window's edges are synchronised).
The stage marks are taken at the edges of the top-level ``record_function`` ranges opened on the training
thread while the window runs (this module wraps ``record_function``'s enter/exit for that time), so the
table shows whatever stages the step marks, the canonical ones first.

The all-reduce: DDP launches each gradient bucket's all-reduce from inside the backward pass, as soon as
the bucket's gradients are ready, and it runs concurrently with the rest of the backward. A comm hook
(DDP's default all-reduce, wrapped) marks each bucket's launch and completion: "all-reduce in flight" is
the time per step during which at least one bucket was being reduced (it overlaps backward, so it is not
added to the stages), and "all-reduce exposed" the part of it after the last bucket's launch, until the end
of the stage that launched it: communication the backward waits for once its last gradient is computed.
Both lie inside a stage already counted; the trace shows the buckets ("all-reduce (bucket N)" on the autograd
thread, gloo/NCCL's own events, and on CUDA the NCCL kernels on their stream).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from torch.autograd.profiler import record_function

from common.cli import ArgumentParser

from .common import ROOT, write_result

CANONICAL_STAGES = ("data wait", "forward", "loss", "backward", "optimizer")
DATA_WAIT = "data wait"
INPUT_BOUND_WAIT = 0.10  # data-wait share of the step above which the run is input-bound
TRANSPARENT_RANGES = ("ProfilerStep#",)  # the profiler's own per-step range encloses the stages


# --------------------------------------------------------------------------- the marks


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
        tracked = threading.get_ident() == self._thread and not rf.name.startswith(TRANSPARENT_RANGES)
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
            intervals.append((launched, self.clock.mark()))  # on CUDA: ordered after the collective's kernels
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
    return [n for n in CANONICAL_STAGES if n in seen] + [n for n in seen if n not in CANONICAL_STAGES]


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
        raise ValueError(f"{len(stage_steps)} steps of stage marks but {len(step_seconds)} clocked steps")
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

    stages = [row(name, per_step[name], ranges_per_step=counts[name] / max(1, len(step_seconds))) for name in names]
    attributed = [sum(per_step[name][i] for name in names) for i in range(len(step_seconds))]
    unattributed = [step - covered for step, covered in zip(step_seconds, attributed)]
    table = {
        "stages": stages,
        "unattributed": row("unattributed", unattributed),
        "step": row("step (independent clock)", list(step_seconds)),
        "attributed_share": float(np.sum(attributed) / np.sum(step_seconds)) if np.sum(step_seconds) else 0.0,
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
            stage_end = next((end for _, start, end in step if start <= last_launch <= end), last_launch)
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
        clipped = [(max(start, float(e["ts"])), min(end, float(e["ts"]) + float(e.get("dur", 0)))) for e in selected]
        return union_length([(a, b) for a, b in clipped if b > a])

    copies = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("gpu_memcpy", "gpu_memset")]
    wall = end - start
    return {
        "kernel_busy_fraction": busy(kernels) / wall if wall else 0.0,
        "kernel_or_copy_busy_fraction": busy(kernels + copies) / wall if wall else 0.0,
        "window_ms": wall / 1000,
        "kernels": len(kernels),
    }


# --------------------------------------------------------------------------- the run


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            "what": "CUDA caching allocator, profiled window",
        }
    return {
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "what": "process peak resident memory (whole run)",
    }


def pipeline_alone(cfg, device: torch.device, rank: int, world: int, loader_factory, seconds: float) -> dict:
    """The training loader alone (same factory, shards, batch and threads), drained for ``seconds``."""
    from .pipeline import _timed

    loader = loader_factory(cfg, device, rank, world)
    return _timed(loader, seconds, device.type == "cuda", restart=lambda: loader)


def verdict(images_per_step: float, mean_step: float, mean_wait: float, pipeline_images_per_s: float | None) -> dict:
    """Input- or compute-bound: the step's demand (images/s it would consume with data always ready) against
    the pipeline's ceiling, and the data wait the loop actually saw."""
    compute = mean_step - mean_wait
    demand = images_per_step / compute if compute > 0 else float("inf")
    wait_fraction = mean_wait / mean_step if mean_step else 0.0
    too_slow = pipeline_images_per_s is not None and pipeline_images_per_s < 0.9 * demand
    bound = "input-bound" if wait_fraction > INPUT_BOUND_WAIT or too_slow else "compute-bound"
    pipeline = f"{pipeline_images_per_s:.0f} img/s" if pipeline_images_per_s is not None else "(not measured)"
    if bound == "input-bound":
        line = (
            f"input-bound: the pipeline delivers {pipeline}, the step consumes {demand:.0f} img/s; "
            f"the loop waited for data {wait_fraction:.0%} of each step"
        )
        if pipeline_images_per_s is not None and not too_slow:
            line += (
                " (alone, the pipeline keeps up: in training it competes with the step for the same cores or device)"
            )
    else:
        line = (
            f"compute-bound: the step consumes {demand:.0f} img/s, the pipeline delivers {pipeline}; "
            f"data wait {wait_fraction:.0%} of each step"
        )
    return {
        "bound": bound,
        "line": line,
        "step_demand_images_per_s": demand,
        "pipeline_images_per_s": pipeline_images_per_s,
        "data_wait_fraction": wait_fraction,
    }


def run(
    cfg,
    warmup_steps: int = 5,
    profile_steps: int = 10,
    pipeline_seconds: float = 10.0,
    trace_dir: str | Path | None = None,
    loader_factory=None,
    model_factory=None,
    accelerator=None,
    quiet: bool = False,
) -> dict:
    """Profile ``cfg``'s training step; returns this rank's result (the ``per_rank`` entry of the JSON).

    ``loader_factory(cfg, device, rank, world)`` and ``model_factory(cfg, device_type, world)`` default to
    train.py's (``build_train_loader``, ``build_model``)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.nn.parallel import DistributedDataParallel

    from trainer.build import build_model, prepare_for_training
    from trainer.data import build_train_loader, data_device
    from trainer.meters import StepTimer, device_clock
    from trainer.optim import build_optimizer, build_scheduler
    from trainer.step import train_step

    loader_factory = loader_factory or build_train_loader
    model_factory = model_factory or build_model
    accelerator = accelerator or Accelerator(mixed_precision=cfg.precision, cpu=not torch.cuda.is_available())
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    say = (lambda *a: None) if quiet else accelerator.print

    loader = loader_factory(cfg, device, rank, world)
    steps_per_epoch = len(loader)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    set_seed(cfg.seed)
    model = model_factory(cfg, device.type, world)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    model, optimizer = prepare_for_training(accelerator, model, optimizer)
    forward = torch.compile(model) if cfg.compile else model
    clock = device_clock(device)
    allreduce = None
    if isinstance(model, DistributedDataParallel):
        allreduce = AllReduceRecorder(clock)
        model.register_comm_hook(None, allreduce.hook)

    batches, epoch_ends = iter(loader), 0

    def next_batch():
        nonlocal batches, epoch_ends
        while True:
            try:
                return next(batches)
            except StopIteration:  # end of epoch: the loader moves to the next one (its cost stays in the data wait)
                batches, epoch_ends = iter(loader), epoch_ends + 1

    step = 0

    def one_step(timer=None, recorder=None):
        nonlocal step
        if timer:
            timer.start_wait()
        if recorder:
            recorder.begin_step()
            if allreduce:
                allreduce.begin_step()
        with record_function(DATA_WAIT):
            view1, view2 = next_batch()
        if timer:
            timer.end_wait()
        train_step(forward, optimizer, view1, view2, cfg, accelerator)
        step += 1
        scheduler.step_update(step)
        if timer:
            timer.end_step()

    say(
        f"profile: {world} process(es) on {device.type}, data on {data_device(cfg, device)}, batch {cfg.batch_size}; "
        f"{warmup_steps} warm-up + 1 profiler warm-up + {profile_steps} profiled steps"
    )
    for _ in range(warmup_steps):
        one_step()

    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    profiler = torch.profiler.profile(
        activities=activities, schedule=torch.profiler.schedule(wait=0, warmup=1, active=profile_steps, repeat=1)
    )
    timer = StepTimer(images_per_step=cfg.batch_size // world, clock=clock, keep_steps=True)
    recorder = StageRecorder(clock)
    profiler.start()
    one_step()  # the profiler's own warm-up step (its start-up cost stays out of the trace)
    profiler.step()
    clock.synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    epoch_ends_before = epoch_ends
    reference = clock.mark()
    if allreduce:
        allreduce.active = True
    with recorder:
        for _ in range(profile_steps):
            one_step(timer, recorder)
            profiler.step()
    clock.synchronize()
    profiler.stop()
    if allreduce:
        allreduce.active = False
    timer.summary()  # reads the marks
    stage_steps = resolve(clock, reference, recorder.steps)
    allreduce_steps = resolve(clock, reference, allreduce.steps) if allreduce else None
    waits = [wait for wait, _ in timer.history]
    step_seconds = [elapsed for _, elapsed in timer.history]
    table = stage_table(stage_steps, step_seconds, allreduce_steps)
    memory = peak_memory(device)

    trace_path = None
    utilisation = None
    if trace_dir is not None:
        trace_path = Path(trace_dir) / f"rank{rank}.pt.trace.json.gz"
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(trace_path))
        if device.type == "cuda":
            utilisation = gpu_utilisation(read_trace(trace_path))

    batches = loader = None  # the training loader's DALI threads stop before the pipeline is measured alone
    gc.collect()
    pipeline = (
        pipeline_alone(cfg, device, rank, world, loader_factory, pipeline_seconds) if pipeline_seconds > 0 else None
    )
    local_batch = cfg.batch_size // world
    mean_step, mean_wait = float(np.mean(step_seconds)), float(np.mean(waits))
    return {
        "rank": rank,
        "device": str(device),
        "local_batch": local_batch,
        "steps": len(step_seconds),
        "images_per_s": local_batch * len(step_seconds) / sum(step_seconds),
        "data_wait_fraction": sum(waits) / sum(step_seconds),
        "median_step_ms": 1000 * float(np.median(step_seconds)),
        "epoch_boundaries_in_window": epoch_ends - epoch_ends_before,
        "table": table,
        "memory": memory,
        "gpu_utilisation": utilisation,
        "trace": str(trace_path) if trace_path else None,
        "pipeline_alone": pipeline,
        "verdict": verdict(local_batch, mean_step, mean_wait, pipeline["images_per_s"] if pipeline else None),
    }


# --------------------------------------------------------------------------- report


def format_table(result: dict) -> str:
    """The stage table of one rank, as printed."""
    table = result["table"]

    def line(label: str, row: dict) -> str:
        return f"  {label:<58}{row['mean_ms']:>10.1f}{row['p90_ms']:>10.1f}{row['share']:>8.1%}"

    lines = [
        f"rank {result['rank']} ({result['device']}), {result['steps']} profiled steps "
        f"of {result['local_batch']} images:",
        f"  {'stage':<58}{'mean ms':>10}{'p90 ms':>10}{'share':>8}",
    ]
    for row in table["stages"]:
        count = f" (x{row['ranges_per_step']:g} per step)" if row["ranges_per_step"] != 1 else ""
        lines.append(line(row["name"] + count, row))
    if table["allreduce"]:
        for key in ("in_flight", "exposed"):
            lines.append(line("  [" + table["allreduce"][key]["name"] + "]", table["allreduce"][key]))
    lines.append(line("unattributed (step - stages)", table["unattributed"]))
    lines.append(line(table["step"]["name"], table["step"]))
    lines.append(
        f"  images/s {result['images_per_s']:.1f}, data wait {result['data_wait_fraction']:.1%}, "
        f"stages attribute {table['attributed_share']:.1%} of the clocked step"
    )
    memory = result["memory"]
    lines.append(
        "  peak memory: " + ", ".join(f"{k} {v:.2f}" for k, v in memory.items() if k != "what") + f" ({memory['what']})"
    )
    if result["gpu_utilisation"]:
        lines.append(
            "  GPU utilisation (busy kernel time / wall time, from the trace): "
            f"{result['gpu_utilisation']['kernel_busy_fraction']:.1%}"
        )
    if result["pipeline_alone"]:
        lines.append(
            f"  pipeline alone (same shards, batch, threads): {result['pipeline_alone']['images_per_s']:.1f} images/s"
        )
    return "\n".join(lines)


def combined_verdict(per_rank: list[dict]) -> dict:
    """Over ranks: the pipelines' ceilings add up, the steps run in lock-step, the worst data wait counts."""
    mean_step = float(np.mean([r["table"]["step"]["mean_ms"] for r in per_rank])) / 1000
    wait = max(r["data_wait_fraction"] for r in per_rank) * mean_step
    pipelines = [r["pipeline_alone"]["images_per_s"] for r in per_rank if r["pipeline_alone"]]
    pipeline = float(sum(pipelines)) if len(pipelines) == len(per_rank) else None
    return verdict(sum(r["local_batch"] for r in per_rank), mean_step, wait, pipeline)


def parse(argv):
    """(profile options, TrainConfig): the profile's own flags, then train.py's (``--config`` and fields)."""
    from trainer.config import ConfigError, parse_args

    parser = ArgumentParser(
        prog="bench.py profile",
        description=__doc__.splitlines()[0],
        epilog="Every other flag is train.py's (python train.py --help).",
    )
    parser.add_argument(
        "--warmup_steps", type=int, default=5, help="untimed steps first (DALI and the allocator warm up)"
    )
    parser.add_argument("--profile_steps", type=int, default=10, help="steps in the trace and the table")
    parser.add_argument(
        "--pipeline_seconds", type=float, default=10.0, help="the pipeline alone, measured for this long (0: skip)"
    )
    parser.add_argument("--trace_dir", default=None, help="default runs/profile_<config>/")
    parser.add_argument("--json", default=None, help="default bench/results/profile_<config>_<device>.json")
    options, rest = parser.parse_known_args(argv)
    if options.profile_steps < 1 or options.warmup_steps < 0:
        parser.error("--profile_steps must be >= 1 and --warmup_steps >= 0")
    try:
        cfg = parse_args(rest)
        cfg.validate(int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    config_files = [rest[i + 1] for i, arg in enumerate(rest[:-1]) if arg == "--config"] + [
        a.split("=", 1)[1] for a in rest if a.startswith("--config=")
    ]
    options.name = Path(config_files[-1]).stem if config_files else "default"
    return options, cfg


def main(argv=None) -> dict | None:
    from pipeline.shardset import ShardError

    options, cfg = parse(sys.argv[1:] if argv is None else argv)
    trace_dir = Path(options.trace_dir) if options.trace_dir else ROOT / "runs" / f"profile_{options.name}"
    try:
        result = run(cfg, options.warmup_steps, options.profile_steps, options.pipeline_seconds, trace_dir)
    except ShardError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    per_rank = [result]
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        per_rank = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(per_rank, result)
        if torch.distributed.get_rank() != 0:
            return None
    for rank_result in per_rank:
        print(format_table(rank_result))
    overall = combined_verdict(per_rank)
    print(overall["line"])
    payload = {
        "config": cfg.to_dict(),
        "warmup_steps": options.warmup_steps,
        "profile_steps": options.profile_steps,
        "pipeline_seconds": options.pipeline_seconds,
        "world_size": len(per_rank),
        "verdict": overall,
        "per_rank": per_rank,
        "images_per_s": cfg.batch_size / (float(np.mean([r["table"]["step"]["mean_ms"] for r in per_rank])) / 1000),
        "trace_dir": str(trace_dir),
        "clock": "CUDA events (device time)" if per_rank[0]["device"].startswith("cuda") else "host perf_counter",
    }
    path = write_result(f"profile_{options.name}", payload, options.json)
    print(f"trace: {trace_dir}/rank*.pt.trace.json.gz (Perfetto / chrome://tracing / TensorBoard); wrote {path}")
    return payload


if __name__ == "__main__":
    main()

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
thread, gloo/NCCL's own events, and on CUDA the NCCL kernels on their stream). The recorders, the table's
arithmetic and the trace reading live in ``bench.step_marks``.
"""

from __future__ import annotations

import gc
import os
import resource
import sys
from pathlib import Path

import numpy as np
import torch
from torch.autograd.profiler import record_function

from ..common.cli import ArgumentParser
from .common import ROOT, write_result
from .step_marks import (
    AllReduceRecorder,
    StageRecorder,
    gpu_utilisation,
    read_trace,
    resolve,
    stage_table,
)

DATA_WAIT = "data wait"
INPUT_BOUND_WAIT = 0.10  # data-wait share of the step above which the run is input-bound


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


def pipeline_alone(
    cfg, device: torch.device, rank: int, world: int, loader_factory, seconds: float
) -> dict:
    """The training loader alone (same factory, shards, batch and threads), drained for ``seconds``."""
    from .pipeline import _timed

    loader = loader_factory(cfg, device, rank, world)
    return _timed(loader, seconds, device.type == "cuda", restart=lambda: loader)


def verdict(
    images_per_step: float, mean_step: float, mean_wait: float, pipeline_images_per_s: float | None
) -> dict:
    """Input- or compute-bound: the step's demand (images/s it would consume with data always ready) against
    the pipeline's ceiling, and the data wait the loop actually saw."""
    compute = mean_step - mean_wait
    demand = images_per_step / compute if compute > 0 else float("inf")
    wait_fraction = mean_wait / mean_step if mean_step else 0.0
    too_slow = pipeline_images_per_s is not None and pipeline_images_per_s < 0.9 * demand
    bound = "input-bound" if wait_fraction > INPUT_BOUND_WAIT or too_slow else "compute-bound"
    pipeline = (
        f"{pipeline_images_per_s:.0f} img/s"
        if pipeline_images_per_s is not None
        else "(not measured)"
    )
    if bound == "input-bound":
        line = (
            f"input-bound: the pipeline delivers {pipeline}, the step consumes {demand:.0f} img/s; "
            f"the loop waited for data {wait_fraction:.0%} of each step"
        )
        if pipeline_images_per_s is not None and not too_slow:
            line += (
                " (alone, the pipeline keeps up: in training it competes with the step"
                " for the same cores or device)"
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


class TrainingLoop:
    """train.py's step on ``cfg``, one step at a time: the loader, model, optimiser and schedule built as train.py
    builds them (``loader_factory(cfg, device, rank, world)``, ``model_factory(cfg, device_type, world)``), and,
    when the model is wrapped in DDP, an ``AllReduceRecorder`` hooked into its gradient all-reduce."""

    def __init__(self, cfg, accelerator, loader_factory, model_factory):
        from accelerate.utils import set_seed
        from torch.nn.parallel import DistributedDataParallel

        from ..trainer.build import prepare_for_training
        from ..trainer.meters import device_clock
        from ..trainer.optim import build_optimizer, build_scheduler
        from ..trainer.step import train_step

        self.cfg, self.accelerator, self.train_step = cfg, accelerator, train_step
        world, rank, device = (
            accelerator.num_processes,
            accelerator.process_index,
            accelerator.device,
        )
        self.loader = loader_factory(cfg, device, rank, world)
        steps_per_epoch = len(self.loader)
        total_steps = max(1, round(cfg.epochs * steps_per_epoch))
        set_seed(cfg.seed)
        model = model_factory(cfg, device.type, world)
        optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(
            optimizer, total_steps, round(cfg.warmup_epochs * steps_per_epoch)
        )
        model, self.optimizer = prepare_for_training(accelerator, model, optimizer)
        self.forward = torch.compile(model) if cfg.compile else model
        self.clock = device_clock(device)
        self.allreduce = None
        if isinstance(model, DistributedDataParallel):
            self.allreduce = AllReduceRecorder(self.clock)
            model.register_comm_hook(None, self.allreduce.hook)
        self.batches, self.epoch_ends, self.steps_done = iter(self.loader), 0, 0

    def next_batch(self):
        while True:
            try:
                return next(self.batches)
            except (
                StopIteration
            ):  # end of epoch: the loader moves to the next one (its cost stays in the data wait)
                self.batches, self.epoch_ends = iter(self.loader), self.epoch_ends + 1

    def step(self, timer=None, recorder=None) -> None:
        """One training step; with ``timer`` its data wait and length clocked, with ``recorder`` its stages marked."""
        if timer:
            timer.start_wait()
        if recorder:
            recorder.begin_step()
            if self.allreduce:
                self.allreduce.begin_step()
        with record_function(DATA_WAIT):
            view1, view2, *labels = self.next_batch()  # labels: from labelled shards (SupCon)
        if timer:
            timer.end_wait()
        self.train_step(
            self.forward, self.optimizer, view1, view2, self.cfg, self.accelerator, *labels
        )
        self.steps_done += 1
        self.scheduler.step_update(self.steps_done)
        if timer:
            timer.end_step()

    def release_loader(self) -> None:
        """Drop the training loader (its DALI threads stop) before the pipeline is measured alone."""
        self.batches = self.loader = None
        gc.collect()


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

    from ..trainer.build import build_model
    from ..trainer.data import build_train_loader, data_device

    loader_factory = loader_factory or build_train_loader
    accelerator = accelerator or Accelerator(
        mixed_precision=cfg.precision, cpu=not torch.cuda.is_available()
    )
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    loop = TrainingLoop(cfg, accelerator, loader_factory, model_factory or build_model)
    if not quiet:
        accelerator.print(
            f"profile: {world} process(es) on {device.type}, data on {data_device(cfg, device)}, "
            f"batch {cfg.batch_size}; {warmup_steps} warm-up + 1 profiler warm-up + {profile_steps} profiled steps"
        )
    for _ in range(warmup_steps):
        loop.step()
    profiler, step_seconds, waits, table, epoch_boundaries = profile_window(
        loop, profile_steps, world
    )
    memory = peak_memory(device)
    trace_path, utilisation = (
        export_trace(profiler, trace_dir, rank, device) if trace_dir is not None else (None, None)
    )
    loop.release_loader()
    pipeline = (
        pipeline_alone(cfg, device, rank, world, loader_factory, pipeline_seconds)
        if pipeline_seconds > 0
        else None
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
        "epoch_boundaries_in_window": epoch_boundaries,
        "table": table,
        "memory": memory,
        "gpu_utilisation": utilisation,
        "trace": str(trace_path) if trace_path else None,
        "pipeline_alone": pipeline,
        "verdict": verdict(
            local_batch, mean_step, mean_wait, pipeline["images_per_s"] if pipeline else None
        ),
    }


def profile_window(loop: TrainingLoop, profile_steps: int, world: int):
    """One profiler warm-up step, then ``profile_steps`` steps under ``torch.profiler`` with their stages marked
    and each step clocked independently. Returns (profiler, step seconds, data-wait seconds, stage table,
    epoch boundaries crossed in the window)."""
    from ..trainer.meters import StepTimer

    cfg, clock, allreduce = loop.cfg, loop.clock, loop.allreduce
    device = loop.accelerator.device
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    profiler = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=0, warmup=1, active=profile_steps, repeat=1),
    )
    timer = StepTimer(images_per_step=cfg.batch_size // world, clock=clock, keep_steps=True)
    recorder = StageRecorder(clock)
    profiler.start()
    loop.step()  # the profiler's own warm-up step (its start-up cost stays out of the trace)
    profiler.step()
    clock.synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    epoch_ends_before = loop.epoch_ends
    reference = clock.mark()
    if allreduce:
        allreduce.active = True
    with recorder:
        for _ in range(profile_steps):
            loop.step(timer, recorder)
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
    return profiler, step_seconds, waits, table, loop.epoch_ends - epoch_ends_before


def export_trace(
    profiler, trace_dir: str | Path, rank: int, device: torch.device
) -> tuple[Path, dict | None]:
    """This rank's Chrome trace, ``trace_dir/rank<r>.pt.trace.json.gz``, and on CUDA the GPU utilisation read off it."""
    trace_path = Path(trace_dir) / f"rank{rank}.pt.trace.json.gz"
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(trace_path))
    return trace_path, (gpu_utilisation(read_trace(trace_path)) if device.type == "cuda" else None)


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
            lines.append(
                line("  [" + table["allreduce"][key]["name"] + "]", table["allreduce"][key])
            )
    lines.append(line("unattributed (step - stages)", table["unattributed"]))
    lines.append(line(table["step"]["name"], table["step"]))
    lines.append(
        f"  images/s {result['images_per_s']:.1f}, data wait {result['data_wait_fraction']:.1%}, "
        f"stages attribute {table['attributed_share']:.1%} of the clocked step"
    )
    memory = result["memory"]
    lines.append(
        "  peak memory: "
        + ", ".join(f"{k} {v:.2f}" for k, v in memory.items() if k != "what")
        + f" ({memory['what']})"
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
    from ..trainer.config import ConfigError, parse_args

    parser = ArgumentParser(
        prog="bench.py profile",
        description=__doc__.splitlines()[0],
        epilog="Every other flag is train.py's (python train.py --help).",
    )
    warmup_help = "untimed steps first (DALI and the allocator warm up)"
    parser.add_argument("--warmup_steps", type=int, default=5, help=warmup_help)
    parser.add_argument(
        "--profile_steps", type=int, default=10, help="steps in the trace and the table"
    )
    parser.add_argument(
        "--pipeline_seconds",
        type=float,
        default=10.0,
        help="the pipeline alone, measured for this long (0: skip)",
    )
    parser.add_argument("--trace_dir", default=None, help="default runs/profile_<config>/")
    parser.add_argument(
        "--json", default=None, help="default bench/results/profile_<config>_<device>.json"
    )
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
    from ..pipeline.shards.shardset import ShardError

    options, cfg = parse(sys.argv[1:] if argv is None else argv)
    trace_dir = (
        Path(options.trace_dir) if options.trace_dir else ROOT / "runs" / f"profile_{options.name}"
    )
    try:
        result = run(
            cfg, options.warmup_steps, options.profile_steps, options.pipeline_seconds, trace_dir
        )
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
        "images_per_s": cfg.batch_size
        / (float(np.mean([r["table"]["step"]["mean_ms"] for r in per_rank])) / 1000),
        "trace_dir": str(trace_dir),
        "clock": "CUDA events (device time)"
        if per_rank[0]["device"].startswith("cuda")
        else "host perf_counter",
    }
    path = write_result(f"profile_{options.name}", payload, options.json)
    print(
        f"trace: {trace_dir}/rank*.pt.trace.json.gz (Perfetto / chrome://tracing / TensorBoard); wrote {path}"
    )
    return payload


if __name__ == "__main__":
    main()

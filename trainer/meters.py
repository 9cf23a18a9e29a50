"""The training loop's meters (``Meters``), its clock (``TrainClock``) and the throughput timer under them: is
the accelerator starved? ``data_wait_fraction`` is the share of step time the
training loop spent waiting for the next batch from the data pipeline (0 = never starved).

A step runs from asking for its batch to the end of the optimiser step; logging, evaluation and
checkpointing between steps are not counted.

Clocks. On the CPU a step's work is done when the host's call returns, so host clocks measure it. On a CUDA
device the host only queues kernels: a host clock around a step measures launch time, and a host clock
around ``next(loader)`` counts waits that the GPU, still busy with queued work, never noticed. So on CUDA
every mark is a CUDA event recorded on the current stream (``CudaClock``): it completes when the device
reaches that point of the stream, and the time between two marks is device time. A step is then the
device's time from finishing the previous step to finishing this one, and the data wait the part of it
before the batch had arrived (the device idle, or copying the batch). The events are read, with one
synchronisation, only when a window is read (every ``log_every`` steps in train.py): the device never
waits for the meters.
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

from ..model.ntxent import positive_pair_accuracy
from .config import TrainConfig
from .plan import StepPlan
from .trackers import log_to_trackers


class HostClock:
    """Marks are host ``perf_counter`` seconds: right where the device works synchronously (the CPU)."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return end - start

    def synchronize(self) -> None:
        pass


class CudaClock:
    """Marks are CUDA events on the current stream of ``device``: the time between two marks is the time the
    device took from reaching the first to reaching the second. Read them after ``synchronize()``."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device if device is not None else "cuda")

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1000.0

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


def device_clock(device: torch.device | str | None) -> HostClock | CudaClock:
    """The clock that measures work on ``device``: CUDA events on a CUDA device, the host clock elsewhere."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return CudaClock(device) if device.type == "cuda" else HostClock()


class StepTimer:
    """Images/s and data-wait fraction of the training loop, measured on the device's own clock.

    Call ``start_wait()`` before asking the loader for a batch, ``end_wait()`` when it arrived and
    ``end_step()`` after the optimiser step. ``window()`` reads the marks taken since its last call (one
    device synchronisation), ``summary()`` everything so far. ``keep_steps=True`` also keeps every step's
    ``(wait_s, step_s)`` in ``history`` (profiling runs)."""

    def __init__(
        self,
        images_per_step: int,
        device: torch.device | str | None = None,
        clock=None,
        keep_steps: bool = False,
    ):
        self.images_per_step = images_per_step
        self.clock = clock if clock is not None else device_clock(device)
        self.keep_steps = keep_steps
        self.history: list[tuple[float, float]] = []
        self.window_wait = self.window_time = 0.0
        self.window_steps = 0
        self.total_wait = self.total_time = 0.0
        self.total_steps = 0
        self._start = self._ready = None
        self._pending: list[tuple] = []  # (start, ready, end) marks of steps not read yet

    def start_wait(self) -> None:
        self._start = self.clock.mark()

    def end_wait(self) -> None:
        self._ready = self.clock.mark()

    def end_step(self) -> None:
        self._pending.append((self._start, self._ready, self.clock.mark()))

    def _read(self) -> None:
        """Resolve the pending marks into durations (the one synchronisation of a window)."""
        if not self._pending:
            return
        self.clock.synchronize()
        for start, ready, end in self._pending:
            waited, elapsed = self.clock.seconds(start, ready), self.clock.seconds(start, end)
            self.window_wait += waited
            self.window_time += elapsed
            self.window_steps += 1
            self.total_wait += waited
            self.total_time += elapsed
            self.total_steps += 1
            if self.keep_steps:
                self.history.append((waited, elapsed))
        self._pending.clear()

    def window(self) -> dict:
        """Meters over the steps since the last call, then reset the window."""
        self._read()
        stats = {
            "images_per_s": self.window_steps * self.images_per_step / self.window_time
            if self.window_time
            else 0.0,
            "data_wait_fraction": self.window_wait / self.window_time if self.window_time else 0.0,
        }
        self.window_wait = self.window_time = 0.0
        self.window_steps = 0
        return stats

    def summary(self) -> dict:
        self._read()
        summary = {
            "steps_timed": self.total_steps,
            "mean_images_per_s": self.total_steps * self.images_per_step / self.total_time
            if self.total_time
            else 0.0,
            "data_wait_fraction": self.total_wait / self.total_time if self.total_time else 0.0,
        }
        if self.keep_steps and self.history:
            summary["median_step_s"] = statistics.median(step for _, step in self.history)
        return summary


class TrainClock:
    """Training wall-clock, evaluation and checkpoint writing excluded: ``lap()`` after each step adds the time
    since the last mark to ``state.train_seconds``; ``restart()`` after the work at a boundary leaves it out."""

    def __init__(self, state):
        self.state, self.mark = state, time.perf_counter()

    def lap(self) -> None:
        now = time.perf_counter()
        self.state.train_seconds += now - self.mark
        self.mark = now

    def restart(self) -> None:
        self.mark = time.perf_counter()

    def elapsed(self) -> float:
        """Training seconds so far, the running step included."""
        return self.state.train_seconds + time.perf_counter() - self.mark


class Meters:
    """Images/s, data wait, loss, lr and positive-pair accuracy: to the progress bar, the tracker and train.log.

    ``start_wait``/``end_wait``/``end_step`` bracket every step (on the device's own clock); ``log_step`` reads
    the window when ``due``: every ``log_every`` steps and at the last step."""

    def __init__(self, cfg: TrainConfig, accelerator, log, plan: StepPlan, first_step: int):
        self.accelerator, self.log, self.plan, self.every = accelerator, log, plan, cfg.log_every
        self.timer = StepTimer(images_per_step=cfg.batch_size, device=accelerator.device)
        self.progress = tqdm(
            total=plan.last_step,
            initial=first_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (accelerator.is_main_process and cfg.progress),
        )
        self.progress_bar = cfg.progress
        self.start_wait, self.end_wait, self.end_step = (
            self.timer.start_wait,
            self.timer.end_wait,
            self.timer.end_step,
        )
        self.online_probe, self.online_probe_top1 = None, None  # trainer/online_probe.py

    def attach_probe(self, probe):
        """Report ``probe``'s running top-1 (trainer/online_probe.py) with the meters; returns it."""
        self.online_probe = probe
        return probe

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.plan.last_step

    def log_step(self, step: int, out, optimizer) -> None:
        """Meters of the window ending at ``step`` (``out``: the step's ``StepOutput``)."""
        meters = {
            "loss": self.accelerator.reduce(out.loss, "mean").item(),
            "lr": optimizer.param_groups[0]["lr"],
            "pos_acc": positive_pair_accuracy(out.z1, out.z2).item(),
            "epoch": self.plan.epoch(step),
            **self.timer.window(),
        }
        if self.accelerator.device.type == "cuda":
            meters["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if (
            self.online_probe is not None
            and (top1 := self.online_probe.read(self.accelerator)) is not None
        ):
            meters["online_probe_top1"] = self.online_probe_top1 = top1
        log_to_trackers(self.accelerator, meters, step)
        line = f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in meters.items())
        (self.log.file_only if self.progress_bar else self.log.info)(
            line
        )  # no bar: the meters as lines
        self.progress.set_postfix(
            loss=f"{meters['loss']:.4f}",
            img_s=f"{meters['images_per_s']:.0f}",
            wait=f"{meters['data_wait_fraction']:.0%}",
            lr=f"{meters['lr']:.3g}",
            **(
                {"probe": f"{meters['online_probe_top1']:.1f}%"}
                if "online_probe_top1" in meters
                else {}
            ),
        )

    def advance(self, step: int) -> None:
        self.progress.total = self.plan.last_step
        self.progress.update(step - self.progress.n)

    def close(self) -> None:
        self.progress.close()  # before any message, so that it starts on a line of its own

    def summary(self) -> dict:
        extra = (
            {}
            if self.online_probe_top1 is None
            else {"online_probe_top1": round(self.online_probe_top1, 2)}
        )
        return {**self.timer.summary(), **extra}

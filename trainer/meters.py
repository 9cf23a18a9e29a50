"""Throughput meters: is the accelerator starved? ``data_wait_fraction`` is the share of step time the
training loop spent waiting for the next batch from the data pipeline (0 = never starved)."""

from __future__ import annotations

import time


class StepTimer:
    """Host-side timing of ``wait for batch`` and whole steps, per logging window and for the run."""

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.window_wait = self.window_time = 0.0
        self.window_steps = 0
        self.total_wait = self.total_time = 0.0
        self.total_steps = 0
        self._step_start = None
        self._wait_start = None

    def start_wait(self) -> None:
        now = time.perf_counter()
        if self._step_start is not None:  # the previous step ends where the next wait begins
            elapsed = now - self._step_start
            self.window_time += elapsed
            self.total_time += elapsed
            self.window_steps += 1
            self.total_steps += 1
        self._step_start = self._wait_start = now

    def end_wait(self) -> None:
        waited = time.perf_counter() - self._wait_start
        self.window_wait += waited
        self.total_wait += waited

    def pause(self) -> None:
        """Stop the clock (evaluation, checkpointing): the next step starts fresh."""
        self._step_start = None

    def window(self) -> dict:
        """Meters over the steps since the last call, then reset the window."""
        stats = {
            "images_per_s": self.window_steps * self.images_per_step / self.window_time if self.window_time else 0.0,
            "data_wait_fraction": self.window_wait / self.window_time if self.window_time else 0.0,
        }
        self.window_wait = self.window_time = 0.0
        self.window_steps = 0
        return stats

    def summary(self) -> dict:
        return {
            "steps_timed": self.total_steps,
            "mean_images_per_s": self.total_steps * self.images_per_step / self.total_time if self.total_time else 0.0,
            "data_wait_fraction": self.total_wait / self.total_time if self.total_time else 0.0,
        }

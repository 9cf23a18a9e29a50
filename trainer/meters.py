"""Throughput meters: is the accelerator starved? ``data_wait_fraction`` is the share of step time the
training loop spent waiting for the next batch from the data pipeline (0 = never starved).

Host-side clocks: a step runs from asking for its batch to the end of the optimiser step; logging,
evaluation and checkpointing between steps are not counted."""

from __future__ import annotations

import time


class StepTimer:
    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.window_wait = self.window_time = 0.0
        self.window_steps = 0
        self.total_wait = self.total_time = 0.0
        self.total_steps = 0
        self._start = 0.0

    def start_wait(self) -> None:
        self._start = time.perf_counter()

    def end_wait(self) -> None:
        waited = time.perf_counter() - self._start
        self.window_wait += waited
        self.total_wait += waited

    def end_step(self) -> None:
        elapsed = time.perf_counter() - self._start
        self.window_time += elapsed
        self.total_time += elapsed
        self.window_steps += 1
        self.total_steps += 1

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

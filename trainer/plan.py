"""A run's length and cadence in steps, from its config and the loader's steps per epoch."""

from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig


@dataclass
class StepPlan:
    """The schedule's length and warm-up, where this run stops, and how often it evaluates, in steps."""

    steps_per_epoch: int
    total_steps: int  # the schedule's length (warm-up + cosine spans it)
    warmup_steps: int
    last_step: (
        int  # where this run stops: total_steps, max_steps, or the step the time budget ran out at
    )
    eval_interval: int

    @classmethod
    def of(cls, cfg: TrainConfig, steps_per_epoch: int) -> StepPlan:
        total = max(1, round(cfg.epochs * steps_per_epoch))
        return cls(
            steps_per_epoch,
            total,
            round(cfg.warmup_epochs * steps_per_epoch),
            min(total, cfg.max_steps or total),
            max(1, round((cfg.eval_every_epochs or 0) * steps_per_epoch)),
        )

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch

    def end_at(self, step: int) -> bool:
        """Make ``step`` the last one (the time budget ran out); False if the run ends there anyway."""
        if step >= self.last_step:
            return False
        self.last_step = step
        return True

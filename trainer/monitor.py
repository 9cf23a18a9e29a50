"""The in-training evaluation: kNN + a fast linear classifier on the backbone's frozen features every
``eval_every_epochs`` (and at step 0 and the end), its curve kept in the training state's history (so a
checkpoint carries it), the tracker and ``eval_json``. A preemption signal interrupts it at once: it always
follows a checkpoint of its step, and the resumed run evaluates that step first."""

from __future__ import annotations

import json

import torch

from ..common.files import atomic_write_text
from .config import TrainConfig
from .plan import StepPlan
from .preemption import Preempted
from .trackers import log_to_trackers


class EvalMonitor:
    """Decides when an evaluation is due and runs it; ``evaluate`` raises ``Preempted`` on every rank when a
    preemption signal reached any rank before or during it."""

    def __init__(
        self,
        cfg: TrainConfig,
        backbone: torch.nn.Module,
        loaders,
        accelerator,
        log,
        preemption,
        consensus,
    ):
        self.cfg, self.backbone, self.loaders, self.accelerator = (
            cfg,
            backbone,
            loaders,
            accelerator,
        )
        self.log, self.preemption, self.consensus = log, preemption, consensus

    def due(self, step: int, plan: StepPlan) -> bool:
        return bool(self.loaders) and (step % plan.eval_interval == 0 or step == plan.last_step)

    def catch_up(self, state, plan: StepPlan) -> None:
        """Step 0's evaluation, or the one a preemption skipped, if it has not been done yet."""
        due = bool(self.loaders) and (state.step == 0 or state.step % plan.eval_interval == 0)
        if due and state.step not in [h["step"] for h in state.history]:
            self.evaluate(state, plan)

    def evaluate(self, state, plan: StepPlan) -> None:
        """Evaluate at ``state.step``; its result goes to the history, the log, the tracker and eval_json."""
        from ..evaluation import monitor

        if self.consensus.agree(
            preempted=self.preemption.requested
        ).preempted:  # skipped on every rank
            raise Preempted(self.preemption.signal_name)
        with self.preemption.interruptible():
            result = monitor.frozen_metrics(
                self.backbone,
                *self.loaders,
                self.accelerator,
                k=self.cfg.eval_knn_k,
                knn_temperature=self.cfg.eval_knn_temperature,
                progress=False,
            )
        epoch = plan.epoch(state.step)
        state.history.append(
            {
                "step": state.step,
                "epoch": epoch,
                "train_seconds": round(state.train_seconds, 2),
                **result,
            }
        )
        self.log.info(
            f"eval @ epoch {epoch:.2f}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items())
        )
        log_to_trackers(self.accelerator, result, state.step)
        if self.cfg.eval_json and self.accelerator.is_main_process:
            atomic_write_text(
                self.cfg.eval_json,
                json.dumps({"config": self.cfg.to_dict(), "history": state.history}, indent=1)
                + "\n",
            )

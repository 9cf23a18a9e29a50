"""The pieces of train.py's loop that are bookkeeping rather than training: when a step is a boundary
(meters, evaluation, checkpoint), the meters themselves, and the evaluation curve of the in-training probe."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..common.files import atomic_write_text
from ..model.ntxent import positive_pair_accuracy
from .config import TrainConfig
from .meters import StepTimer

NON_FINITE_EXIT_STATUS = 3


class NonFinite(Exception):
    """The loss or the weights became non-finite at ``step`` (nothing of them is checkpointed)."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


@dataclass(frozen=True)
class StepPlan:
    """The run's length and cadence in steps, from its config and the loader's steps per epoch."""

    steps_per_epoch: int
    total_steps: int  # the schedule's length (warm-up + cosine spans it)
    warmup_steps: int
    last_step: int  # where this run stops: total_steps, or max_steps
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


class Meters:
    """Images/s, data wait, loss, lr and positive-pair accuracy: to the progress bar, the tracker and train.log.

    ``start_wait``/``end_wait``/``end_step`` bracket every step (on the device's own clock); ``log`` reads the
    window at a log boundary."""

    def __init__(self, cfg: TrainConfig, accelerator, log, plan: StepPlan, first_step: int):
        self.accelerator, self.log, self.plan = accelerator, log, plan
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
        self.start_wait, self.end_wait, self.end_step = self.timer.start_wait, self.timer.end_wait, self.timer.end_step
        self.online_probe, self.online_probe_top1 = None, None  # issue 31: trainer/online_probe.py

    def attach_probe(self, probe):
        """Report ``probe``'s running top-1 (trainer/online_probe.py) with the meters; returns it."""
        self.online_probe = probe
        return probe

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
        if self.online_probe is not None and (top1 := self.online_probe.read(self.accelerator)) is not None:
            meters["online_probe_top1"] = self.online_probe_top1 = top1
        self.accelerator.log(meters, step=step)
        line = f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in meters.items())
        (self.log.file_only if self.progress_bar else self.log.info)(line)  # no bar: the meters as lines
        self.progress.set_postfix(
            loss=f"{meters['loss']:.4f}",
            img_s=f"{meters['images_per_s']:.0f}",
            wait=f"{meters['data_wait_fraction']:.0%}",
            lr=f"{meters['lr']:.3g}",
            **({"probe": f"{meters['online_probe_top1']:.1f}%"} if "online_probe_top1" in meters else {}),
        )

    def advance(self, step: int) -> None:
        self.progress.update(step - self.progress.n)

    def close(self) -> None:
        self.progress.close()  # before any message, so that it starts on a line of its own

    def summary(self) -> dict:
        extra = {} if self.online_probe_top1 is None else {"online_probe_top1": round(self.online_probe_top1, 2)}
        return {**self.timer.summary(), **extra}


class Probe:
    """The in-training evaluation (kNN + fast linear probe of the backbone), its curve in the training state's
    history, the tracker and ``cfg.eval_json``; interruptible by a preemption signal."""

    def __init__(
        self, cfg: TrainConfig, backbone: torch.nn.Module, loaders, accelerator, log, preemption, plan: StepPlan
    ):
        self.cfg, self.backbone, self.loaders, self.accelerator = cfg, backbone, loaders, accelerator
        self.log, self.preemption, self.plan = log, preemption, plan

    def due(self, step: int) -> bool:
        return bool(self.loaders) and (step % self.plan.eval_interval == 0 or step == self.plan.last_step)

    def missing(self, state) -> bool:
        """Step 0's evaluation, or the one a preemption skipped, has not been done yet."""
        due = bool(self.loaders) and (state.step == 0 or state.step % self.plan.eval_interval == 0)
        return due and state.step not in [h["step"] for h in state.history]

    def __call__(self, state) -> None:
        from ..evaluation.probe import probe

        with self.preemption.interruptible():
            result = probe(
                self.backbone,
                *self.loaders,
                self.accelerator,
                k=self.cfg.eval_knn_k,
                knn_temperature=self.cfg.eval_knn_temperature,
                progress=False,
            )
        epoch = self.plan.epoch(state.step)
        state.history.append(
            {"step": state.step, "epoch": epoch, "train_seconds": round(state.train_seconds, 2), **result}
        )
        self.log.info(f"eval @ epoch {epoch:.2f}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))
        self.accelerator.log(result, step=state.step)
        if self.cfg.eval_json and self.accelerator.is_main_process:
            atomic_write_text(
                self.cfg.eval_json,
                json.dumps({"config": self.cfg.to_dict(), "history": state.history}, indent=1) + "\n",
            )

"""What train.py's loop holds between steps (``Session``) and the components that decide for themselves when
they are due: the checkpointer (``TrainingCheckpointer.maybe_save``), the meters and the evaluation monitor.
A run stops early by an exception, ``Preempted``, ``BadData`` or ``NonFinite`` (``STOPS``), which
``stopped`` turns into a checkpoint of the last good step, one message and the exit status."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..common.errors import SimclrError
from ..pipeline.shards.s3 import ObjectStoreError
from ..pipeline.shards.shardset import ShardError
from .checkpoint import Checkpointer, TrainingState, epoch_start_state
from .config import TrainConfig
from .consensus import RankConsensus
from .health import NonFinite, NonFiniteWatch
from .meters import Meters, TrainClock
from .monitor import EvalMonitor
from .plan import StepPlan
from .preemption import Preempted, Preemption
from .run import Run, RunLog


class BadData(SimclrError):
    """A rank could not get its batch; ``errors``: every rank's ``batch_error`` (None where it had none). Either
    the data is bad (an image it cannot decode) or the object store failed (``store``: down past its retries, or
    a bucket or key gone mid-run): two causes with different remedies, so the message names which."""

    def __init__(self, errors: list[dict | None]):
        super().__init__("; ".join(e["message"] for e in errors if e))
        self.errors = errors

    @property
    def store(self) -> bool:
        return any(e and e["store"] for e in self.errors)


def batch_error(error: ShardError) -> dict:
    """What a rank tells the others (as JSON) about the batch it could not get."""
    return {"message": str(error), "store": isinstance(error, ObjectStoreError)}


STOPS = (Preempted, BadData, NonFinite)


class TrainingCheckpointer:
    """Checkpoints of the training state: ``maybe_save`` writes one when due (every ``checkpoint_every`` steps,
    at the last step, or forced: the clock, a preemption, before an evaluation), never of non-finite weights."""

    def __init__(self, cfg: TrainConfig, checkpointer: Checkpointer, parts: Session):
        self.cfg, self.checkpointer, self.parts = cfg, checkpointer, parts

    def due_by_clock(self) -> bool:
        return self.checkpointer.due_by_clock()

    def maybe_save(self, step: int, force: bool = False) -> None:
        every = self.cfg.checkpoint_every
        if force or step == self.parts.plan.last_step or bool(every and step % every == 0):
            self.save()

    def save(self, loader_state: dict | None = None, **extra) -> None:
        """A checkpoint of the current step (``loader_state``: the data position, the loader's by default)."""
        parts, state = self.parts, self.parts.state
        parts.health.raise_if_bad(parts.accelerator)
        data = {
            "step": state.step,
            "epoch": parts.plan.epoch(state.step),
            "steps_per_epoch": parts.plan.steps_per_epoch,
            "train_seconds": state.train_seconds,
            "history": state.history,
            "config": self.cfg.to_dict(),
            **extra,
        }
        saved = self.checkpointer.save(
            parts.model, parts.optimizer, data, loader_state or parts.loader.state_dict()
        )
        parts.log.info(
            f"checkpoint {saved.path} written in {saved.seconds:.2f} s ({saved.bytes / 2**20:.1f} MiB)"
        )


@dataclass
class Session:
    """A training run, assembled by train.py's ``setup``: config, run, data, model, state and the components
    that decide when they are due."""

    cfg: TrainConfig
    accelerator: Any
    consensus: RankConsensus
    preemption: Preemption
    log: RunLog
    run: Run
    loader: Any
    model: Any
    forward: Any
    optimizer: Any
    scheduler: Any
    state: TrainingState
    plan: StepPlan
    health: NonFiniteWatch
    meters: Meters
    monitor: EvalMonitor
    checkpointer: TrainingCheckpointer = None  # set by attach_checkpointer (it reads the session)
    clock: TrainClock = None
    online_probe: Any = None  # trainer/online_probe.py, where the shards carry labels

    def __post_init__(self):
        self.batches, self.clock = iter(self.loader), TrainClock(self.state)

    def attach_checkpointer(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = TrainingCheckpointer(self.cfg, checkpointer, self)

    def next_batch(self) -> tuple[Any, dict | None]:
        """(the two views, None), or (None, ``batch_error``) when this rank cannot get its batch; a new epoch
        begins where the last one ended."""
        self.meters.start_wait()
        views, error = None, None
        try:  # one try around both: a new epoch's iterator fetches (and decodes) its first batches at once
            while views is None:
                try:
                    views = next(self.batches)
                except StopIteration:
                    self.batches = iter(self.loader)
        except ShardError as bad:  # an image this rank cannot decode, or the object store failed
            error = batch_error(bad)
        self.meters.end_wait()
        return views, error

    def close(self) -> None:
        """Release the data loaders' pipelines now (``DaliLoader.close``), not at the next garbage collection."""
        for loader in [self.loader, *(self.monitor.loaders or ())]:
            close = getattr(loader, "close", None)  # the torchvision baseline's DataLoader has none
            if close is not None:
                close()

    def out_of_time(self) -> bool:
        return (
            bool(self.cfg.max_train_minutes)
            and self.clock.elapsed() >= 60 * self.cfg.max_train_minutes
        )

    def end_early(self, step: int) -> None:
        """The time budget makes ``step`` the last one."""
        if self.plan.end_at(step):
            self.log.info(
                f"time budget of {self.cfg.max_train_minutes:g} training minutes reached at step {step}"
            )

    def after_step(self, out) -> int:
        """Count the step just taken: schedule, meters, the non-finite watch, the clock; returns its number."""
        self.state.step += 1
        self.scheduler.step_update(self.state.step)
        self.meters.end_step()
        self.health.update(self.state.step, out.loss)
        self.clock.lap()
        return self.state.step


def stopped(stop: Exception, session: Session) -> int:
    """The end of a run stopped early: a checkpoint of the last good step where none holds it yet (after bad
    data, positioned at its epoch's beginning), the message that says how to continue, the exit status."""
    state, log, checkpointer = session.state, session.log, session.checkpointer
    if isinstance(stop, NonFinite):
        log.error(
            f"error: {stop}; stopping without a checkpoint of them. This run's good checkpoints in "
            f"{session.cfg.output_dir}/checkpoints are intact; lower lr or use precision=no to investigate."
        )
        return stop.exit_status
    try:
        if isinstance(stop, BadData) and state.step > (checkpointer.checkpointer.last_step or 0):
            restart = epoch_start_state(
                getattr(session.loader, "epoch", 0),
                session.consensus.rank,
                session.consensus.world_size,
            )
            cause = "the object store failed" if stop.store else "bad data"
            checkpointer.save(
                restart,
                data_position=f"the epoch restarts from its beginning (the run stopped: {cause})",
            )
    except NonFinite as bad:
        log.error(f"error: {bad}; nothing checkpointed")
        return bad.exit_status
    last = checkpointer.checkpointer.last_path
    where = f"checkpoint {last}" if state.step else "nothing to checkpoint (no step was taken)"
    if isinstance(stop, BadData):
        report_bad_data(stop, session, where)
        return stop.exit_status
    preemption = session.preemption
    since = (  # a rank the signal did not reach stops on the others' word: no time of its own
        f", {time.monotonic() - preemption.received_at:.1f} s after {preemption.signal_name}"
        if preemption.received_at
        else ""
    )
    log.info(
        f"preempted at step {state.step}: {where}{since}; exiting with status "
        f"{stop.exit_status:d}. Rerun the same command with --resume auto to continue run {session.run.run_id}"
    )
    return stop.exit_status


def report_bad_data(stop: BadData, session: Session, where: str) -> None:
    """Each rank's message, then what to do: a store outage is named as one (bring the store back, resume), not
    as bad data (rewrite the sample)."""
    log, step = session.log, session.state.step
    what = "object store failure" if stop.store else "bad data"
    for rank, error in enumerate(stop.errors):
        if error:
            kind = "object store failure" if error["store"] else "bad data"
            log.error(f"error: {kind} on rank {rank}: {error['message']}")
    if stop.store:
        log.error(
            f"stopped after step {step} on an {what} ({where} holds the last good step; the epoch restarts from its "
            "beginning); when the store answers again and the objects named above are there, rerun with --resume auto"
        )
    else:
        log.error(
            f"stopped after step {step} on {what} ({where} holds the last good step); remove or rewrite "
            "that sample (simclr-shards verify names every bad one), then rerun with --resume auto"
        )

"""The trackers' writes on the run's one write-error path (issue 30). TensorBoard (and W&B's local files) write
where the run writes: a full disk under them is a ``ResultWriteError`` naming the tracker's directory, so
train.py exits 1 with one line in the log, as for a checkpoint, the export or eval_json, and the checkpoints stay
intact for ``--resume auto``; never a traceback from inside Accelerate.

What is intercepted: the trackers' start (event file, hyperparameters), each ``log`` and their end. TensorBoard
writes every record from its own writer thread (``_AsyncWriterThread``, one append per record); a failed write
ends that thread, and TensorBoard keeps the exception and raises it again in the foreground at the next
``add_scalar``/``flush``, which Accelerate's ``log`` calls every time: ``log_to_trackers`` reports it there. The
thread's own copy would also be printed as a traceback by ``threading.excepthook``; ``start_trackers`` installs
a hook that leaves out exactly that one (an ``OSError`` in TensorBoard's writer thread), since it is reported as
one line instead. W&B writes from its own service process, outside this process's reach: its local-file
failures are W&B's to report.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .export import ResultWriteError
from .run import tracker_init_kwargs, tracker_project


def tracker_directories(accelerator) -> str:
    """Where the started trackers write (TensorBoard's ``logging_dir``, W&B's run directory), for messages."""
    found = []
    for tracker in getattr(accelerator, "trackers", []):
        where = getattr(tracker, "logging_dir", None)
        if where is None and getattr(tracker, "run", None) is not None:
            where = getattr(tracker.run, "dir", None)
        found.append(str(where) if where else f"the {tracker.name} tracker's directory")
    return ", ".join(found) or str(Path(getattr(accelerator, "project_dir", None) or "."))


def _write_failure(accelerator, error: OSError, doing: str) -> ResultWriteError:
    where = tracker_directories(accelerator)
    return ResultWriteError(
        f"cannot write the tracker's files in {where} while {doing} ({error.filename or where}: "
        f"{error.strerror or error}); the checkpoints are intact (--resume auto goes on from the newest)"
    )


def _quiet_tensorboard_writer_failures() -> None:
    """``threading.excepthook`` without the traceback of an ``OSError`` that ends TensorBoard's writer thread
    (TensorBoard raises it again in the foreground, where ``log_to_trackers`` reports it in one line); every
    other thread exception goes to the hook that was there. Installed once."""
    previous = threading.excepthook
    if previous is _TENSORBOARD_HOOKS.get("installed"):
        return

    def hook(args) -> None:
        if (
            isinstance(args.exc_value, OSError)
            and type(args.thread).__name__ == "_AsyncWriterThread"
        ):
            return
        previous(args)

    _TENSORBOARD_HOOKS["installed"] = hook
    threading.excepthook = hook


# the hook installed, so that a second run in this process adds no second one
_TENSORBOARD_HOOKS: dict[str, Callable] = {}


def start_trackers(accelerator, cfg, run, step: int) -> None:
    """``accelerator.init_trackers`` for ``cfg.tracker`` (none: nothing), continuing the run's tracker run on
    resume (``run.tracker_init_kwargs``); a write failure is a ``ResultWriteError`` naming the directory."""
    if cfg.tracker == "none":
        return
    if cfg.tracker == "tensorboard":
        _quiet_tensorboard_writer_failures()
    try:
        accelerator.init_trackers(
            tracker_project(cfg),
            config=cfg.tracker_config(),
            init_kwargs=tracker_init_kwargs(cfg, run, step),
        )
    except OSError as error:
        raise _write_failure(accelerator, error, "starting them") from None


def log_to_trackers(accelerator, values: dict, step: int) -> None:
    """``accelerator.log(values, step)``; a write failure (a full disk) is a ``ResultWriteError`` naming the
    tracker's directory (train.py: exit 1, the log says it, the checkpoints intact)."""
    try:
        accelerator.log(values, step=step)
    except OSError as error:
        raise _write_failure(accelerator, error, f"logging step {step}") from None


def end_trackers(accelerator) -> None:
    """``accelerator.end_training()`` (closes the trackers' files) in train.py's ``finally``, where the exit
    status is already decided: a failure here (every logged value was flushed by ``log`` already, so at most
    the closing records are lost) is one warning line naming the directory, never a traceback."""
    try:
        accelerator.end_training()
    except OSError as error:
        print(
            f"warning: {_write_failure(accelerator, error, 'closing them')}",
            file=sys.stderr,
            flush=True,
        )

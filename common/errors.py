"""The project's errors and exit statuses, named once.

Every error a command reports to its user derives from ``SimclrError`` and carries the status the command exits
with (``exit_status``), so an entry point maps any of them to its status in one ``except`` clause instead of a
table of bare numbers. The statuses are the contract of docs/design.md: schedulers requeue on 75 (sysexits.h's
``EX_TEMPFAIL``), scripts tell bad input (2) from a crash (1)."""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """What a command's exit status means."""

    DONE = 0
    OTHER = 1  # anything else: a crash, a checkpoint that cannot be written (a full disk, ...)
    BAD_INPUT = (
        2  # a config value, data, an output directory, an incompatible resume: the message names it
    )
    NON_FINITE = 3  # the loss or the weights became non-finite: nothing of them is checkpointed
    PREEMPTED = 75  # a signal asked to stop: a checkpoint was written; rerun with --resume auto


class SimclrError(Exception):
    """An error reported to the user as one line; ``exit_status`` is the command's status (bad input unless a
    subclass says otherwise)."""

    exit_status: ExitStatus = ExitStatus.BAD_INPUT

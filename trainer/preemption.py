"""Preemption: SIGTERM, SIGINT or SIGUSR1 asks the run to checkpoint and exit with ``ExitStatus.PREEMPTED``.

The handler only sets a flag; the loop exchanges it with every rank before each step (``RankConsensus.agree``), so
a signal that reaches a single rank stops them all after the same step. During an evaluation (which always
follows a checkpoint of its step) the signal interrupts it at once: the resumed run evaluates first.

Schedulers requeue on the status: 75 is ``EX_TEMPFAIL`` from sysexits.h ("try again later"). Under a
launcher (torchrun, ``accelerate launch``) the launcher's own status is 1 whenever a worker exits non-zero;
docker/slurm.sbatch therefore requeues on the signal it received, not on a status."""

from __future__ import annotations

import contextlib
import signal
import threading
import time

from ..common.errors import ExitStatus, SimclrError

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(SimclrError):
    """A preemption signal stopped the run: raised inside ``Preemption.interruptible()`` when it arrives, and by
    the loop when every rank agreed to stop."""

    exit_status = ExitStatus.PREEMPTED


class Preemption:
    def __init__(self):
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self._interruptible = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        if (
            self.requested and signum == signal.SIGINT
        ):  # a second Ctrl-C: stop now, without a checkpoint
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if not self.requested:
            self.signal_name, self.received_at = signal.Signals(signum).name, time.monotonic()
        if self._interruptible:
            self._interruptible = False
            raise Preempted(self.signal_name)

    @contextlib.contextmanager
    def interruptible(self):
        """A block (an evaluation) that a preemption signal interrupts at once by raising ``Preempted``."""
        if self.requested:
            raise Preempted(self.signal_name)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def restore(self) -> None:
        """Put the previous handlers back (a process that runs ``train.main`` more than once: tests)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

"""Worker processes that die with their parent, whatever kills it (SIGKILL and the OOM killer included).

A ``ProcessPoolExecutor``'s workers outlive a parent killed without clean-up: reparented to PID 1, blocked
on their task pipe, still holding the parent's stdout (a wrapper reading it never sees EOF). Every pool of
ours is made by ``process_pool``: its workers ask Linux for ``PR_SET_PDEATHSIG`` = SIGKILL at start, and
exit at once if the parent is already gone. The spawn context's resource tracker then sees its pipe close
and exits too. (Linux sends the signal when the *thread* that started the worker ends: pools are made and
used by one long-lived thread, the main thread in our commands.)"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int, *_worker_id) -> None:
    """Pool initializer (or a torch DataLoader's ``worker_init_fn``, which passes the worker id): SIGKILL this
    process when its parent dies; exit now if the parent already died."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def process_pool(workers: int, start_method: str = "spawn") -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``workers`` processes whose workers die with this process.

    Spawned by default, never forked from a caller that may hold DALI's threads and GBs of reserved address
    space (a fork must commit the parent's whole private mapping: it failed with ENOMEM in a long test session);
    ``start_method="fork"`` where a caller knows better."""
    context = multiprocessing.get_context(start_method)
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=die_with_parent,
        initargs=(os.getpid(),),
    )

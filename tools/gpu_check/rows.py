"""Rows of ``bench.py gpu-check``, appended one JSON line at a time as each lands, and the pytest plugin that
writes one per test (``pytest -p bench.gpu_rows``): a check killed mid-stage keeps every finished row.

A row is a JSON object with at least ``stage`` and ``event`` ("row" for a benchmark or check result; "collected",
"start" and "result" for pytest). The file is ``$GPU_CHECK_ROWS`` (the stage: ``$GPU_CHECK_STAGE``). Imports
nothing heavy: pytest loads it before collecting.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ROWS_ENV, STAGE_ENV = "GPU_CHECK_ROWS", "GPU_CHECK_STAGE"


def append_row(path: str | os.PathLike | None, row: dict) -> None:
    """One line, one write(2) on an O_APPEND file: a kill leaves whole lines behind (a torn last line at worst,
    which ``read_rows`` drops)."""
    if not path:
        return
    line = json.dumps({"time_unix": round(time.time(), 3), **row}, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_rows(path: str | os.PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """The whole rows after byte ``offset`` and the offset after the last whole line (read again from there)."""
    try:
        data = Path(path).read_bytes()[offset:]
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows, offset + end


def emit(row: dict) -> None:
    """Append ``row`` (tagged with this process's stage) to the check's rows file, if this runs under the check."""
    append_row(
        os.environ.get(ROWS_ENV), {"stage": os.environ.get(STAGE_ENV, "?"), "event": "row", **row}
    )


# --------------------------------------------------------------------------- pytest plugin (-p bench.gpu_rows)


def pytest_collection_finish(session) -> None:
    emit({"event": "collected", "tests": [item.nodeid for item in session.items]})


def pytest_runtest_logstart(nodeid, location) -> None:
    emit({"event": "start", "test": nodeid})


def pytest_runtest_logreport(report) -> None:
    # one result per test: the call phase, or the setup/teardown phase that failed or skipped it
    if report.when == "call" or report.outcome != "passed":
        message = ""
        if report.outcome != "passed":
            longrepr = report.longrepr
            message = (
                longrepr[2]
                if isinstance(longrepr, tuple)
                else str(getattr(longrepr, "reprcrash", longrepr))
            )
        emit(
            {
                "event": "result",
                "test": report.nodeid,
                "when": report.when,
                "outcome": report.outcome,
                "seconds": round(report.duration, 2),
                "message": str(message)[-800:],
            }
        )

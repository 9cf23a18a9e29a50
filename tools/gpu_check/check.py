"""The GPU check's running state (tools/gpu_check; bench/GPU_CHECK.md): one ``Check`` per call, each stage in its own
process under its cap, rows merged into ``gpu_check.json`` as they land, the files a device call brings back.

Every row (a kernel case, a benchmark configuration, a test result) is appended to ``gpu_check.jsonl`` as it lands
and merged into ``gpu_check.json`` (rewritten atomically every second while a stage runs), so a call killed at its
limit keeps everything finished before. The stages (stages.py) use this module; it imports none of them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from simclr_dali.common.files import atomic_write_text

from .plan import GROUP_BUDGET_S
from .rows import ROWS_ENV, STAGE_ENV, read_rows

ROOT = Path(__file__).resolve().parents[2]  # the checkout
MAX_FILES, MAX_FILE_BYTES = (
    8,
    16 * 2**20,
)  # what a device call brings back from $OUT: files, bytes per file
STAGING = Path("/tmp/stage")  # where the carried pieces are kept and unpacked on the GPU machine
SITE = STAGING / "site"  # the staged wheels' install target (PYTHONPATH)
PIECES = (
    ROOT / ".gpu" / "simclr"
)  # carried piece folders (tools/gpu_check/stage.sh writes them; git-ignored)

# --------------------------------------------------------------------------- the check's state


@dataclass
class Check:
    out: Path
    work: Path
    dry_run: bool
    deadline: float
    group: str
    cuda: bool = False
    dali: bool = False
    shards: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    rows_read: int = 0
    last_save: float = 0.0

    @property
    def log(self) -> Path:
        return self.out / "gpu_check.log"

    @property
    def rows_path(self) -> Path:
        return self.out / "gpu_check.jsonl"

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.time() - self.report["started_unix"], 1)
        atomic_write_text(
            self.out / "gpu_check.json", json.dumps(self.report, indent=1, default=str) + "\n"
        )
        self.last_save = time.time()

    def merge_rows(self) -> list[dict]:
        """New rows of the rows file into their stages' entries in the report."""
        rows, self.rows_read = read_rows(self.rows_path, self.rows_read)
        for row in rows:
            entry = self.report["stages"].setdefault(row.get("stage", "?"), {"status": "running"})
            entry.setdefault("rows", []).append(row)
        return rows

    def stage_rows(self, name: str) -> list[dict]:
        self.merge_rows()
        return self.report["stages"].get(name, {}).get("rows", [])

    def env(self, stage: str) -> dict:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TQDM_DISABLE": "1",
            ROWS_ENV: str(self.rows_path),
        }
        env[STAGE_ENV] = stage
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), str(SITE), env.get("PYTHONPATH", "")) if p
        )
        return env

    def run(self, name: str, command: list[str], timeout: float, env: dict | None = None) -> dict:
        """Run ``command`` (cwd: the repository), its output streamed into the log; the report is rewritten with
        the rows that land while it runs; its whole process group is killed at ``timeout`` seconds.
        Returns {returncode, timed_out, seconds, command, output_tail}."""
        env = env or self.env(name)
        with open(self.log, "a") as log:
            log.write(f"\n===== {name}: {' '.join(command)}\n")
            log.flush()
            offset = log.tell()
            start = time.time()
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            timed_out = False
            while True:
                try:
                    returncode = process.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    if self.merge_rows() or time.time() - self.last_save > 5:
                        self.save()
                    if time.time() - start > max(1.0, timeout):
                        _kill_group(process)
                        returncode, timed_out = process.returncode, True
                        break
            seconds = time.time() - start
            log.write(
                f"===== {name}: rc {returncode}{' (timed out)' if timed_out else ''} after {seconds:.1f} s\n"
            )
        with open(self.log, "rb") as log:
            log.seek(offset)
            tail = log.read()[-1500:].decode(errors="replace")
        return {
            "returncode": returncode,
            "timed_out": timed_out,
            "seconds": round(seconds, 1),
            "command": " ".join(Path(c).name if c == sys.executable else c for c in command),
            "output_tail": tail,
        }


def _kill_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def check_files(out: Path) -> dict:
    files = sorted(p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    too_big = [str(p.relative_to(out)) for p in files if p.stat().st_size > MAX_FILE_BYTES]
    return {
        "count": len(files),
        "names": [str(p.relative_to(out)) for p in files],
        "over_16_mib": too_big,
        "ok": len(files) <= MAX_FILES and not too_big,
    }


def trim_log(path: Path, limit: int = MAX_FILE_BYTES - 2**20) -> None:
    """Keep the log under the size a returned file may have: its first MiB and its last part."""
    if path.exists() and path.stat().st_size > limit:
        data = path.read_bytes()
        path.write_bytes(data[: 2**20] + b"\n[... trimmed ...]\n" + data[-(limit - 2**20) :])


# --------------------------------------------------------------------------- running a group


def start_check(args, group: str, dry_budget: float = 0.0) -> Check:
    out = Path(args.out or ROOT / "runs" / ("gpu_check_dry" if args.dry_run else "gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    for (
        path
    ) in out.iterdir():  # nothing left over from an earlier run (this folder comes back whole)
        if path.is_file():
            path.unlink()
    budget = (
        args.budget_s
        if args.budget_s is not None
        else dry_budget
        if args.dry_run
        else GROUP_BUDGET_S[group]
    )
    start = time.time()
    check = Check(
        out=out,
        work=Path(tempfile.mkdtemp(prefix="gpu-check-")),
        dry_run=args.dry_run,
        deadline=start + budget,
        group=group,
    )
    check.rows_path.touch()
    check.report = {
        "check": "python -m tools.gpu_check",
        "group": group,
        "dry_run": args.dry_run,
        "budget_s": budget,
        "started_unix": start,
        "command": " ".join(["python", "-m", "tools.gpu_check", *sys.argv[1:]]),
        "stages": {},
        "status": "running",
    }
    check.save()
    return check


def missing_needs(check: Check, needs: tuple[str, ...]) -> list[str]:
    missing = []
    for need in needs:
        if need == "cuda" and not (check.cuda or check.dry_run):
            missing.append("CUDA")
        elif need == "dali" and not check.dali:
            missing.append("DALI (not importable: its bundle is not staged; see the pieces stage)")
        elif (
            need not in ("cuda", "dali")
            and check.report["stages"].get(need, {}).get("status") != "passed"
        ):
            missing.append(f"the {need} stage")
    return missing


def run_stage(check: Check, stage) -> dict:
    """One stage: skipped (with the reason) when what it needs is missing or its cap no longer fits, else run under
    its cap; an exception is recorded as a failure, so the next stage still runs."""
    cap = stage.dry_cap_s if check.dry_run else stage.cap_s
    left = check.deadline - time.time()
    missing = missing_needs(check, stage.needs)
    if missing:
        return {"status": "skipped", "note": "needs " + " and ".join(missing)}
    if left < min(cap, stage.min_s):
        return {
            "status": "skipped",
            "note": f"out of time: {left:.0f} s of the {check.report['budget_s']:.0f} s left",
        }
    cap = min(cap, left)
    entry = check.report["stages"].setdefault(stage.name, {})
    entry.update(status="running", cap_s=round(cap, 1))
    check.save()
    stage_start = time.time()
    try:
        result = stage.run(check, cap)
    except Exception as error:  # recorded, and the next stage runs
        result = {"status": "failed", "note": f"{type(error).__name__}: {error}"}
    result.setdefault("seconds", round(time.time() - stage_start, 1))
    result["cap_s"] = round(cap, 1)
    result["rows"] = check.stage_rows(stage.name)
    return result


def finish_check(check: Check) -> int:
    trim_log(check.log)
    check.merge_rows()
    failed = [n for n, s in check.report["stages"].items() if s["status"] in ("failed", "timeout")]
    check.report["status"] = "failed: " + ", ".join(failed) if failed else "complete"
    check.report["notes"] = {
        n: f"{s['status']}: {s['note']}" for n, s in check.report["stages"].items() if s.get("note")
    }
    check.save()
    check.report["files"] = check_files(check.out)
    check.save()
    shutil.rmtree(check.work, ignore_errors=True)
    print(
        f"gpu check {check.report['status']} in {check.report['elapsed_s']:.0f} s; "
        f"files: {check.report['files']['count']} "
        f"({'ok' if check.report['files']['ok'] else 'over the limit'}); {check.out / 'gpu_check.json'}",
        flush=True,
    )
    return 1 if failed or not check.report["files"]["ok"] else 0

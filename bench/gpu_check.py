"""`bench.py gpu-check`: what only a GPU can show, in groups that each fit one device call (bench/GPU_CHECK.md).

    python bench.py gpu-check --group first --out DIR   # call 1: nothing staged but a < 1 MiB wheel piece
    python bench.py gpu-check --group dali --out DIR    # the call that brings the bundle's last part
    python bench.py gpu-check --stage_only --out DIR    # a call that brings a part: install it, say what is missing
    python bench.py gpu-check --dry_run [--group G]     # the same on the CPU at tiny sizes (tests run it)
    python bench.py gpu-check --plan                    # the device-time plan and the caps, checked; runs nothing

The stages are a table (``bench.gpu_stages.STAGES``: name, group, cap, what it needs); each runs in its own process
under its cap, and a stage that cannot run (no CUDA, DALI or its data missing, out of time) is recorded as skipped
with the reason. Every row (a kernel case, a benchmark configuration, a test result) is appended to
``gpu_check.jsonl`` as it lands and merged into ``gpu_check.json`` (rewritten atomically every second while a stage
runs), so a call killed at its limit keeps everything finished before. The caps of each group add up to at most
its budget, and the calls of the plan (machine start, the first group, the piece calls, the DALI group, one rerun)
to at most the session's 15 device-minutes: ``--plan`` and the dry run refuse a table that does not fit.
Exit status 0 when no stage failed.
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

from ..common.cli import ArgumentParser
from ..common.files import atomic_write_text
from .gpu_rows import ROWS_ENV, STAGE_ENV, read_rows

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20  # what a device call brings back from $OUT: files, bytes per file
STAGING = Path("/tmp/stage")  # where the carried pieces are kept and unpacked on the GPU machine
SITE = STAGING / "site"  # the staged wheels' install target (PYTHONPATH)
PIECES = ROOT / ".gpu" / "simclr"  # carried piece folders (bench/gpu_stage.sh writes them; git-ignored)

# The session's device time and what each call costs beside its stages (planned, not yet measured: write the
# real figures here after the first run). The machine start is "a minute or more" (the device README): 2 min.
DEVICE_BUDGET_S = 900
MACHINE_START_S = 120
CALL_OVERHEAD_S = 25  # per call: the working tree and the carried piece up, $OUT back, the reply, the next call
PIECE_INSTALL_S = 15  # a piece-only call: copy and checksum one ~60 MiB part (the last one also unpacks)
PLANNED_BUNDLE_PARTS = 3  # DALI + codecs + deps + the ImageNet subset, xz-compressed (~185 MB), when none is staged
GROUP_BUDGET_S = {"first": 230, "dali": 230, "extra": 480}  # "extra": a later session or time left over
PLANNED_GROUPS = ("first", "dali")  # what the plan spends the session on; "extra" only runs when asked for


class PlanError(ValueError):
    pass


def stage_caps(stages, group: str, dry_run: bool = False) -> list[tuple[str, float]]:
    """(name, cap) of the stages a group runs: its own and those of every group ("*")."""
    return [(s.name, s.dry_cap_s if dry_run else s.cap_s) for s in stages if s.group in (group, "*")]


def check_plan(stages, group_budgets=None, parts: int | None = None) -> dict:
    """The device-time plan: every group's caps within its budget, and machine start + the planned groups' calls +
    the piece-only calls + one rerun of the largest stage within the session's device time. Raises PlanError."""
    budgets = group_budgets or GROUP_BUDGET_S
    parts = parts or PLANNED_BUNDLE_PARTS
    problems, groups = [], {}
    for group, budget in budgets.items():
        caps = stage_caps(stages, group)
        total = sum(cap for _, cap in caps)
        groups[group] = {"budget_s": budget, "caps_s": dict(caps), "sum_caps_s": total}
        if total > budget:
            problems.append(f"group {group!r}: stage caps add up to {total:.0f} s, over its {budget:.0f} s budget")
    unknown = {s.group for s in stages} - set(budgets) - {"*"}
    if unknown:
        problems.append(f"stages in groups without a budget: {sorted(unknown)}")
    rerun = max((s.cap_s for s in stages if s.group in PLANNED_GROUPS), default=0) + CALL_OVERHEAD_S
    calls = [("machine start", MACHINE_START_S)]
    calls.append(("call 1: group 'first'", budgets["first"] + CALL_OVERHEAD_S))
    calls += [
        (f"call {k + 2}: bundle part {k + 1} of {parts}", PIECE_INSTALL_S + CALL_OVERHEAD_S) for k in range(parts - 1)
    ]
    calls.append((f"call {parts + 1}: last part + group 'dali'", PIECE_INSTALL_S + budgets["dali"] + CALL_OVERHEAD_S))
    calls.append(("one rerun of the largest stage", rerun))
    total = sum(seconds for _, seconds in calls)
    if total > DEVICE_BUDGET_S:
        problems.append(f"the plan needs {total:.0f} s of device time, over the session's {DEVICE_BUDGET_S} s")
    plan = {"device_budget_s": DEVICE_BUDGET_S, "calls": dict(calls), "total_s": total, "groups": groups}
    if problems:
        raise PlanError("; ".join(problems))
    return plan


def plan_table(plan: dict) -> str:
    lines = [f"{name:<44} {seconds:5.0f} s" for name, seconds in plan["calls"].items()]
    lines.append(f"{'total (of ' + str(plan['device_budget_s']) + ' s)':<44} {plan['total_s']:5.0f} s")
    for group, g in plan["groups"].items():
        caps = ", ".join(f"{n} {c:.0f}" for n, c in g["caps_s"].items())
        lines.append(f"group {group}: {g['sum_caps_s']:.0f} of {g['budget_s']:.0f} s ({caps})")
    return "\n".join(lines)


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
        atomic_write_text(self.out / "gpu_check.json", json.dumps(self.report, indent=1, default=str) + "\n")
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
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", ROWS_ENV: str(self.rows_path)}
        env[STAGE_ENV] = stage
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(SITE), env.get("PYTHONPATH", "")) if p)
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
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
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
            log.write(f"===== {name}: rc {returncode}{' (timed out)' if timed_out else ''} after {seconds:.1f} s\n")
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


def parse(argv, stages):
    parser = ArgumentParser(prog="bench.py gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default runs/gpu_check[_dry])")
    parser.add_argument("--dry_run", action="store_true", help="on the CPU at tiny sizes; skips what needs CUDA")
    parser.add_argument("--group", default="first", choices=sorted(GROUP_BUDGET_S), help="which stages to run")
    parser.add_argument(
        "--only", nargs="+", default=None, choices=[s.name for s in stages], help="run only these stages (any group)"
    )
    parser.add_argument("--budget_s", type=float, default=None, help="time for the stages (default: the group's)")
    parser.add_argument("--stage_only", action="store_true", help="install the carried pieces, report, run nothing")
    parser.add_argument("--plan", action="store_true", help="print the checked device-time plan; run nothing")
    return parser.parse_args(argv)


def start_check(args, group: str, dry_budget: float = 0.0) -> Check:
    out = Path(args.out or ROOT / "runs" / ("gpu_check_dry" if args.dry_run else "gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    for path in out.iterdir():  # nothing left over from an earlier run (this folder comes back whole)
        if path.is_file():
            path.unlink()
    budget = args.budget_s if args.budget_s is not None else dry_budget if args.dry_run else GROUP_BUDGET_S[group]
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
        "check": "bench.py gpu-check",
        "group": group,
        "dry_run": args.dry_run,
        "budget_s": budget,
        "started_unix": start,
        "command": " ".join(["bench.py", "gpu-check", *sys.argv[2:]]),
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
        elif need not in ("cuda", "dali") and check.report["stages"].get(need, {}).get("status") != "passed":
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
        return {"status": "skipped", "note": f"out of time: {left:.0f} s of the {check.report['budget_s']:.0f} s left"}
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
        f"gpu-check {check.report['status']} in {check.report['elapsed_s']:.0f} s; "
        f"files: {check.report['files']['count']} "
        f"({'ok' if check.report['files']['ok'] else 'over the limit'}); {check.out / 'gpu_check.json'}",
        flush=True,
    )
    return 1 if failed or not check.report["files"]["ok"] else 0


def main(argv=None) -> int:
    from .gpu_stages import ALWAYS, STAGES

    args = parse(sys.argv[1:] if argv is None else argv, STAGES)
    try:
        plan = check_plan(STAGES, parts=_staged_parts())
    except PlanError as error:
        print(f"gpu-check: the stage table does not fit the device time: {error}", file=sys.stderr)
        return 2
    if args.plan:
        print(plan_table(plan))
        return 0
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would bury the summary in the device tool's output tail
    if args.dry_run:  # CPU devices even where a GPU is present (read at CUDA's initialisation, not yet happened)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    group = args.group
    if args.stage_only:
        selected = [s for s in STAGES if s.name in ALWAYS]
    elif args.only:  # with the stages they need (a rerun of train_dali regenerates its data first)
        wanted, names = set(args.only), {s.name for s in STAGES}
        for stage in reversed(STAGES):
            if stage.name in wanted:
                wanted |= {n for n in stage.needs if n in names}
        selected = [s for s in STAGES if s.name in ALWAYS or s.name in wanted]
    else:
        selected = [s for s in STAGES if s.name in ALWAYS or s.group == group]
    # the dry run's CPU is slower than its caps say nothing about the device: its budget is its own caps' sum
    check = start_check(args, group, dry_budget=sum(s.dry_cap_s for s in selected))
    check.report["plan"] = plan
    print(
        f"gpu-check{' (dry run)' if args.dry_run else ''} group {group}: {check.out}, "
        f"budget {check.report['budget_s']:.0f} s; stages: {', '.join(s.name for s in selected)}",
        flush=True,
    )
    for stage in selected:
        result = run_stage(check, stage)
        check.report["stages"][stage.name] = result
        check.save()
        print(
            f"  {stage.name:<14} {result['status']:<8} {result.get('seconds', 0):6.1f} s  {result.get('note', '')}",
            flush=True,
        )
    return finish_check(check)


def _staged_parts() -> int | None:
    """The number of bundle parts of the pieces staged here (their manifest), if any."""
    for manifest in sorted(PIECES.glob("p*/MANIFEST.json")):
        try:
            return len(json.loads(manifest.read_text())["parts"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


if __name__ == "__main__":
    sys.exit(main())

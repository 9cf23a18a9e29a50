"""`bench.py gpu-check`: everything that must be seen on a GPU, in one command (<= 5 minutes on one H100).

    python bench.py gpu-check --out DIR            # on the GPU machine, after staging (bench/GPU_CHECK.md)
    python bench.py gpu-check --dry_run            # the same script on the CPU at tiny sizes (a test runs it)

Stages, most important first; each runs in its own process with a time cap, and a stage that cannot run
(no CUDA, no DALI, out of time, its data missing) is recorded as skipped with the reason:
  environment  versions (torch, CUDA, cuDNN, Triton, DALI, timm, Accelerate, webdataset, ...), GPU, driver; the
               project's metadata installed with ``pip install --no-deps`` (not in the dry run)
  data         shards: CIFAR-10 train/test and the ImageNet sample x5, from the staged bundle (or ../shared/data);
               the dry run generates tiny ones
  tests        ``pytest -m gpu``: the Triton kernels compiled for real against float64 (fp32/bf16/fp16, the
               saturated regime), DALI's GPU augmentation statistics, global BN on CUDA with a timm model that
               uses BatchNormAct2d (2 ranks on one GPU), bf16 autocast end to end, the CUDA-event step timer, a
               profiling run on CUDA
  train        ``bench.py train``: ResNet-50, 224 px, bf16, channels-last, synthetic vs DALI feed
  profile      ``bench.py profile`` on the ImageNet preset (batch 256): stage table, trace, GPU utilisation, verdict
  pipeline     ``bench.py pipeline``: two views at 224 px (ImageNet sample) and 32 px (CIFAR), DALI on the GPU
               against a torchvision DataLoader with as many workers as cores
  loss         ``bench.py loss``: Triton vs eager vs torch.compile, 2N = 8,192 and 32,768, bf16
  cifar10      train.py with configs/cifar10.yaml (the GPU preset), training for half the time left, kNN after
               each epoch

Output under ``--out`` (at most 8 files, each <= 16 MiB): gpu_check.json (rewritten before and after every
stage, so a timeout loses nothing), gpu_check.log (every stage's output, streamed), train.json, profile.json,
profile_rank0.pt.trace.json.gz, pipeline.json, loss.json, cifar10.json. Exit status 0 when no stage failed.
The stage functions live in ``bench.gpu_stages``; this module runs them in order and keeps the report.
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

from common.cli import ArgumentParser
from common.files import atomic_write_text

from .common import ROOT, environment
from .gpu_stages import (
    MAX_FILE_BYTES,
    MAX_FILES,
    stage_cifar10,
    stage_data,
    stage_environment,
    stage_loss,
    stage_pipeline,
    stage_profile,
    stage_tests,
    stage_train,
)

STAGED = Path("/tmp/stage/simclr")  # where bench/gpu_stage.sh's bundle unpacks on the GPU machine


@dataclass
class Check:
    out: Path
    work: Path
    dry_run: bool
    data: Path | None
    deadline: float
    cuda: bool = False
    dali: bool = False
    shards: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.out / "gpu_check.log"

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.time() - self.report["started_unix"], 1)
        atomic_write_text(self.out / "gpu_check.json", json.dumps(self.report, indent=1) + "\n")

    def run(self, name: str, command: list[str], timeout: float) -> dict:
        """Run ``command`` (cwd: the repository), its output streamed into the log; kill its whole process
        group at ``timeout`` seconds. Returns {returncode, timed_out, seconds, command, output_tail}."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        with open(self.log, "a") as log:
            log.write(f"\n===== {name}: {' '.join(command)}\n")
            log.flush()
            offset = log.tell()
            start = time.time()
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                returncode, timed_out = process.wait(timeout=max(1.0, timeout)), False
            except subprocess.TimeoutExpired:
                _kill_group(process)
                returncode, timed_out = process.returncode, True
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
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


STAGES = [
    ("environment", stage_environment, 60, 30, ()),
    ("data", stage_data, 60, 60, ()),
    ("tests", stage_tests, 150, 120, ()),
    ("train", stage_train, 60, 60, ("data",)),
    ("profile", stage_profile, 60, 60, ("data", "dali")),
    ("pipeline", stage_pipeline, 60, 60, ("data", "dali")),
    ("loss", stage_loss, 45, 60, ()),
    ("cifar10", stage_cifar10, 120, 60, ("data", "dali")),
]
MIN_STAGE_S = {"cifar10": 60}  # a stage with less time than this left (default 15 s) is skipped


def check_files(out: Path) -> dict:
    files = sorted(p for p in out.rglob("*") if p.is_file())
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


# Files a check writes under --out: removed first, so none is left over from an earlier run.
OUTPUT_FILES = (
    "gpu_check.json",
    "gpu_check.log",
    "train.json",
    "profile.json",
    "profile_rank0.pt.trace.json.gz",
    "pipeline.json",
    "loss.json",
    "cifar10.json",
)


def parse(argv):
    parser = ArgumentParser(prog="bench.py gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=None, help="output folder (default runs/gpu_check, runs/gpu_check_dry with --dry_run)"
    )
    parser.add_argument(
        "--dry_run", action="store_true", help="on the CPU at tiny sizes, generated shards; skips what needs CUDA"
    )
    parser.add_argument("--data", default=None, help=f"the staged bundle (default {STAGED} when it exists)")
    parser.add_argument(
        "--budget_s", type=float, default=300.0, help="total time; stages that no longer fit are skipped"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        choices=[s[0] for s in STAGES],
        help="run these stages (environment and data always run)",
    )
    return parser.parse_args(argv)


def start_check(args) -> Check:
    """A fresh output folder and the check's state, its report saved as 'running'."""
    out = Path(args.out or ROOT / "runs" / ("gpu_check_dry" if args.dry_run else "gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    data = Path(args.data) if args.data else (STAGED if STAGED.is_dir() else None)
    start = time.time()
    check = Check(
        out=out,
        work=Path(tempfile.mkdtemp(prefix="gpu-check-")),
        dry_run=args.dry_run,
        data=data,
        deadline=start + args.budget_s,
    )
    check.report = {
        "check": "bench.py gpu-check",
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
        "started_unix": start,
        "environment": environment(),
        "data": str(data) if data else None,
        "stages": {},
        "status": "running",
    }
    check.save()
    return check


def run_stage(check: Check, args, name: str, function, gpu_cap: float, dry_cap: float, needs: tuple) -> dict:
    """One stage: skipped (with the reason) when what it needs is missing or too little time is left, else run
    under its cap; an exception is recorded as a failure, so the next stage still runs."""
    left = check.deadline - time.time()
    missing = [
        n
        for n in needs
        if (n == "dali" and not check.dali)
        or (n != "dali" and check.report["stages"].get(n, {}).get("status") != "passed")
    ]
    if missing:
        return {
            "status": "skipped",
            "note": "needs "
            + " and ".join("DALI (not importable)" if n == "dali" else f"the {n} stage" for n in missing),
        }
    if left < MIN_STAGE_S.get(name, 15):
        return {"status": "skipped", "note": f"out of time: {left:.0f} s of the {args.budget_s:.0f} s budget left"}
    check.report["stages"][name] = {"status": "running", "cap_s": min(gpu_cap if not args.dry_run else dry_cap, left)}
    check.save()
    stage_start = time.time()
    try:
        stage = function(check, min(gpu_cap if not args.dry_run else dry_cap, left))
    except Exception as error:  # recorded, and the next stage runs
        stage = {"status": "failed", "note": f"{type(error).__name__}: {error}"}
    stage.setdefault("seconds", round(time.time() - stage_start, 1))
    return stage


def finish_check(check: Check) -> int:
    """The final report (status, notes, the files written), the work folder removed; the exit status."""
    trim_log(check.log)
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
    args = parse(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would bury the summary in the device tool's output tail
    if (
        args.dry_run
    ):  # CPU devices even where a GPU is present (read at CUDA's initialisation, which has not happened yet)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    check = start_check(args)
    print(f"gpu-check{' (dry run)' if args.dry_run else ''}: {check.out}, budget {args.budget_s:.0f} s", flush=True)
    for name, function, gpu_cap, dry_cap, needs in STAGES:
        if args.only and name not in args.only and name not in ("environment", "data"):
            continue
        stage = run_stage(check, args, name, function, gpu_cap, dry_cap, needs)
        check.report["stages"][name] = stage
        check.save()
        print(
            f"  {name:<12} {stage['status']:<8} {stage.get('seconds', 0):6.1f} s  {stage.get('note', '')}", flush=True
        )
    return finish_check(check)


if __name__ == "__main__":
    sys.exit(main())

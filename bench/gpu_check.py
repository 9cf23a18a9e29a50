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
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import ArgumentParser
from common.files import atomic_write_text

from .common import ROOT, environment

MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
STAGED = Path("/tmp/stage/simclr")  # where bench/gpu_stage.sh's bundle unpacks on the GPU machine
SHARED_DATA = ROOT.parent / "shared" / "data"
PACKAGES = (
    "torch",
    "torchvision",
    "triton",
    "timm",
    "accelerate",
    "nvidia-dali-cuda130",
    "nvidia-dali-cuda120",
    "nvidia-nvimgcodec-cu13",
    "webdataset",
    "jsonargparse",
    "docstring-parser",
    "numpy",
    "pytest",
    "simclr-dali",
)


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


def _subprocess_result(result: dict, summary: dict | None = None) -> dict:
    status = "timeout" if result["timed_out"] else "passed" if result["returncode"] == 0 else "failed"
    return {"status": status, **result, "summary": summary or {}}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- stages


def stage_environment(check: Check, cap: float) -> dict:
    import importlib.metadata

    import torch

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    check.cuda = torch.cuda.is_available()
    summary = {
        "versions": versions,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if check.cuda else None,
        "python": sys.version.split()[0],
        "cuda_available": check.cuda,
    }
    try:
        import nvidia.dali

        check.dali, summary["dali"] = True, nvidia.dali.__version__
    except ImportError as error:
        summary["dali"] = f"not importable: {error}"
    if check.cuda:
        properties = torch.cuda.get_device_properties(0)
        summary["gpu"] = {
            "name": properties.name,
            "capability": f"{properties.major}.{properties.minor}",
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "multiprocessors": properties.multi_processor_count,
        }
        try:
            summary["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as error:
            summary["driver"] = f"nvidia-smi failed: {error}"
    note = None
    if check.dry_run:
        note = "dry run: the project is not pip-installed"
    else:  # the project's distribution metadata, as the issue asks (it installs no import package)
        result = check.run(
            "pip install --no-deps",
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "--no-compile",
                str(ROOT),
            ],
            cap,
        )
        summary["pip_install_no_deps_returncode"] = result["returncode"]
    return {"status": "passed", "summary": summary, **({"note": note} if note else {})}


def stage_data(check: Check, cap: float) -> dict:
    from .pipeline import imagenet_shards, synthetic_shards

    data = check.work / "data"
    if check.dry_run:
        check.shards["imagenet"], _ = synthetic_shards(data / "imagenet", 64, 96, "generated")
        check.shards["cifar_train"], _ = synthetic_shards(data / "cifar" / "train", 96, 32, "generated")
        check.shards["cifar_test"], _ = synthetic_shards(data / "cifar" / "test", 48, 32, "generated")
        return {
            "status": "passed",
            "summary": {k: str(v) for k, v in check.shards.items()},
            "note": "dry run: generated tiny shards",
        }
    sources = {}
    staged_cifar = check.data / "cifar10-shards.tar.gz" if check.data else None
    if staged_cifar and staged_cifar.exists():
        with tarfile.open(staged_cifar) as bundle:
            bundle.extractall(data, filter="data")
        cifar, sources["cifar"] = data / "cifar10", str(staged_cifar)
    elif (ROOT / "data" / "cifar10" / "test" / "classes.json").exists():
        cifar, sources["cifar"] = ROOT / "data" / "cifar10", "data/cifar10"
    elif (SHARED_DATA / "cifar10").is_dir():
        from .cifar10 import write_shards

        cifar = data / "cifar10"
        sources["cifar"] = write_shards(cifar, None)
    else:
        return {
            "status": "failed",
            "summary": {},
            "note": "no CIFAR-10: stage the bundle (bench/gpu_stage.sh) or pass --data",
        }
    check.shards["cifar_train"], check.shards["cifar_test"] = cifar / "train", cifar / "test"
    staged_imagenet = check.data / "imagenet-sample" if check.data else None
    source = staged_imagenet if staged_imagenet and staged_imagenet.is_dir() else SHARED_DATA / "imagenet-sample"
    if not source.is_dir():
        return {"status": "failed", "summary": {}, "note": f"no ImageNet sample at {source}"}
    check.shards["imagenet"], sources["imagenet"] = imagenet_shards(5, source=source, out=data / "imagenet-sample-x5")
    return {"status": "passed", "summary": {"sources": sources, **{k: str(v) for k, v in check.shards.items()}}}


def stage_tests(check: Check, cap: float) -> dict:
    junit = check.work / "junit.xml"
    # Two GPU tests run what the profile and cifar10 stages run at full size (and check the same things there).
    covered = [
        "tests/test_profile.py::test_profile_on_cuda_reads_gpu_utilisation",
        "tests/test_gpu.py::test_train_py_bf16_with_the_dali_gpu_loader",
    ]
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        "tests",
    ]
    result = check.run("tests", command + [f"--deselect={test}" for test in covered], cap)
    outcomes = {"passed": [], "failed": [], "skipped": []}
    try:
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            name = f"{Path(case.get('file') or case.get('classname', '').replace('.', '/')).stem}::{case.get('name')}"
            failure = case.find("failure") if case.find("failure") is not None else case.find("error")
            if failure is not None:
                outcomes["failed"].append({"test": name, "message": (failure.get("message") or "")[:500]})
            elif case.find("skipped") is not None:
                outcomes["skipped"].append({"test": name, "reason": (case.find("skipped").get("message") or "")[:200]})
            else:
                outcomes["passed"].append(name)
    except (OSError, ElementTree.ParseError):
        pass
    summary = {k: len(v) for k, v in outcomes.items()} | {
        "failures": outcomes["failed"],
        "passed_tests": outcomes["passed"],
        "skipped_tests": outcomes["skipped"],
        "left_to_later_stages": covered,
    }
    stage = _subprocess_result(result, summary)
    if stage["status"] == "passed" and not outcomes["passed"] and outcomes["skipped"]:
        stage["status"], stage["note"] = (
            "skipped",
            f"no CUDA device: all {len(outcomes['skipped'])} GPU-marked tests skipped",
        )
    return stage


def stage_train(check: Check, cap: float) -> dict:
    out = check.out / "train.json"
    command = [
        sys.executable,
        "bench.py",
        "train",
        "--preset",
        "imagenet",
        "--shards",
        str(check.shards["imagenet"]),
        "--json",
        str(out),
    ]
    if check.dry_run:
        command += [
            "--batch_size",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--cores",
            "2",
            "--overrides",
            json.dumps({"backbone": "resnet18", "image_size": 32, "timm_kwargs": {"channels": [8, 16, 32, 64]}}),
        ]
    else:
        command += ["--batch_size", "256", "--steps", "30", "--warmup", "5"]
    command += ["--feeds", "synthetic", "dali"] if check.dali else ["--feeds", "synthetic"]
    result = check.run("train", command, cap)
    saved = _read_json(out) or {}
    summary = {feed: round(r["images_per_s"], 1) for feed, r in saved.get("results", {}).items()}
    summary |= {
        k: saved.get(k) for k in ("model", "image_size", "batch_size", "precision", "pipeline_efficiency") if k in saved
    }
    stage = _subprocess_result(result, summary)
    if not check.dali:
        stage["note"] = "DALI not importable: synthetic feed only"
    return stage


def stage_profile(check: Check, cap: float) -> dict:
    trace_dir, out = check.work / "trace", check.out / "profile.json"
    command = [
        sys.executable,
        "bench.py",
        "profile",
        "--config",
        "configs/imagenet.yaml",
        "--train_shards",
        str(check.shards["imagenet"]),
        "--trace_dir",
        str(trace_dir),
        "--json",
        str(out),
        "--output_dir",
        str(check.work / "profile_run"),
    ]
    if check.dry_run:
        command += [
            "--backbone",
            "resnet18",
            "--timm_kwargs",
            '{"channels": [8, 16, 32, 64]}',
            "--image_size",
            "32",
            "--batch_size",
            "8",
            "--precision",
            "no",
            "--data_threads",
            "2",
            "--warmup_steps",
            "1",
            "--profile_steps",
            "2",
            "--pipeline_seconds",
            "0.5",
        ]
    else:
        command += ["--batch_size", "256", "--warmup_steps", "5", "--profile_steps", "5", "--pipeline_seconds", "5"]
    result = check.run("profile", command, cap)
    saved = _read_json(out) or {}
    summary = {}
    if saved:
        rank = saved["per_rank"][0]
        summary = {
            "verdict": saved["verdict"]["line"],
            "images_per_s": round(rank["images_per_s"], 1),
            "stages_ms": {row["name"]: round(row["mean_ms"], 2) for row in rank["table"]["stages"]},
            "unattributed_ms": round(rank["table"]["unattributed"]["mean_ms"], 2),
            "step_ms": round(rank["table"]["step"]["mean_ms"], 2),
            "gpu_utilisation": rank["gpu_utilisation"],
            "memory": rank["memory"],
        }
    trace = trace_dir / "rank0.pt.trace.json.gz"
    note = None
    if trace.exists():
        if trace.stat().st_size <= MAX_FILE_BYTES:
            shutil.copy(trace, check.out / "profile_rank0.pt.trace.json.gz")
        else:
            note = f"trace of {trace.stat().st_size / 2**20:.1f} MiB not kept (over the 16 MiB a file may have)"
    stage = _subprocess_result(result, summary)
    if check.dry_run:
        note = "dry run on the CPU: host clock, no GPU utilisation"
    elif stage["status"] == "passed" and not (summary.get("gpu_utilisation") or {}).get("kernels"):
        stage["status"], note = "failed", "no GPU utilisation read from the trace (no kernels in it?)"
    return stage | ({"note": note} if note else {})


def stage_pipeline(check: Check, cap: float) -> dict:
    out = check.out / "pipeline.json"
    command = [
        sys.executable,
        "bench.py",
        "pipeline",
        "--imagenet_shards",
        str(check.shards["imagenet"]),
        "--cifar_shards",
        str(check.shards["cifar_train"]),
        "--json",
        str(out),
    ]
    command += ["--runs", "1"] + (["--seconds", "0.5", "--batch_size", "16", "--cores", "2"] if check.dry_run else ["--seconds", "6"])
    result = check.run("pipeline", command, cap)
    saved = _read_json(out) or {}
    summary = {
        name: {
            "dali_images_per_s": round(r["runs"][0]["dali"]["images_per_s"], 1),
            "torchvision_images_per_s": round(r["runs"][0]["torchvision"]["images_per_s"], 1),
            "speedup": r["runs"][0]["speedup"],
        }
        for name, r in saved.get("results", {}).items()
    }
    return _subprocess_result(result, summary | ({"device": saved["device"]} if saved else {}))


def stage_loss(check: Check, cap: float) -> dict:
    out = check.out / "loss.json"
    command = [sys.executable, "bench.py", "loss", "--json", str(out), "--plot", str(check.work / "loss.png")]
    if check.dry_run:  # torch.compile of the loss takes minutes on a CPU: not in the dry run
        command += [
            "--sizes",
            "256",
            "--dtypes",
            "float32",
            "--methods",
            "reference",
            "chunked",
            "fused",
            "--repeats",
            "1",
            "--timeout",
            "60",
        ]
    else:
        command += ["--sizes", "8192", "32768", "--dtypes", "bfloat16", "--repeats", "5"]
    result = check.run("loss", command, cap)
    saved = _read_json(out) or {}
    summary = {
        f"{r['method']} 2N={r['two_n']} {r['dtype']}": round(r["time_ms"], 3)
        if r["status"] == "ok"
        else f"{r['status']}: {r.get('reason', '')}"
        for r in saved.get("results", [])
    }
    stage = _subprocess_result(result, summary)
    if check.dry_run:
        stage["note"] = "dry run: torch.compile not measured (minutes on a CPU); the fused Triton kernels need CUDA"
    return stage


def stage_cifar10(check: Check, cap: float) -> dict:
    out, run_dir = check.out / "cifar10.json", check.work / "cifar10_run"
    command = [
        sys.executable,
        "train.py",
        "--config",
        "configs/cifar10.yaml",
        "--train_shards",
        str(check.shards["cifar_train"]),
        "--eval_train_shards",
        str(check.shards["cifar_train"]),
        "--eval_val_shards",
        str(check.shards["cifar_test"]),
        "--eval_every_epochs",
        "1",
        "--eval_json",
        str(out),
        "--output_dir",
        str(run_dir),
        "--tracker",
        "none",
        "--checkpoint_every",
        "null",
    ]
    if check.dry_run:
        command += [
            "--timm_kwargs",
            '{"channels": [8, 16, 32, 64]}',
            "--proj_hidden",
            "32",
            "--batch_size",
            "16",
            "--epochs",
            "1",
            "--warmup_epochs",
            "0.5",
            "--precision",
            "no",
            "--eval_knn_k",
            "5",
            "--data_threads",
            "2",
            "--log_every",
            "2",
        ]
    else:  # a 30-epoch schedule cut by the time left (half trains, half evaluates): the first epochs of a real run
        train_minutes = min(2.0, max(0.25, cap / 2 / 60))
        command += ["--epochs", "30", "--warmup_epochs", "2", "--max_train_minutes", f"{train_minutes:.2f}"]
    result = check.run("cifar10", command, cap)
    saved = _read_json(out) or {}
    trained = _read_json(run_dir / "train_summary.json") or {}
    history = saved.get("history", [])
    summary = {
        "knn_top1_by_epoch": [(round(h["epoch"], 2), round(h["knn_top1"], 2)) for h in history],
        **{
            k: trained[k] for k in ("steps", "train_seconds", "mean_images_per_s", "data_wait_fraction") if k in trained
        },
    }
    stage = _subprocess_result(result, summary)
    if stage["status"] == "passed" and len(history) < 2:
        stage["status"], stage["note"] = (
            "failed",
            f"{len(history)} kNN evaluation(s): expected one at the start and one per epoch",
        )
    return stage


# name, function, cap on a GPU (s), cap in the dry run (s), what it needs
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


def main(argv=None) -> int:
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
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would bury the summary in the device tool's output tail
    if (
        args.dry_run
    ):  # CPU devices even where a GPU is present (read at CUDA's initialisation, which has not happened yet)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    out = Path(args.out or ROOT / "runs" / ("gpu_check_dry" if args.dry_run else "gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    for name in (
        "gpu_check.json",
        "gpu_check.log",
        "train.json",
        "profile.json",
        "profile_rank0.pt.trace.json.gz",
        "pipeline.json",
        "loss.json",
        "cifar10.json",
    ):
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
    print(f"gpu-check{' (dry run)' if args.dry_run else ''}: {out}, budget {args.budget_s:.0f} s", flush=True)
    for name, function, gpu_cap, dry_cap, needs in STAGES:
        if args.only and name not in args.only and name not in ("environment", "data"):
            continue
        left = check.deadline - time.time()
        missing = [
            n
            for n in needs
            if (n == "dali" and not check.dali)
            or (n != "dali" and check.report["stages"].get(n, {}).get("status") != "passed")
        ]
        if missing:
            stage = {
                "status": "skipped",
                "note": "needs "
                + " and ".join("DALI (not importable)" if n == "dali" else f"the {n} stage" for n in missing),
            }
        elif left < MIN_STAGE_S.get(name, 15):
            stage = {"status": "skipped", "note": f"out of time: {left:.0f} s of the {args.budget_s:.0f} s budget left"}
        else:
            check.report["stages"][name] = {
                "status": "running",
                "cap_s": min(gpu_cap if not args.dry_run else dry_cap, left),
            }
            check.save()
            stage_start = time.time()
            try:
                stage = function(check, min(gpu_cap if not args.dry_run else dry_cap, left))
            except Exception as error:  # recorded, and the next stage runs
                stage = {"status": "failed", "note": f"{type(error).__name__}: {error}"}
            stage.setdefault("seconds", round(time.time() - stage_start, 1))
        check.report["stages"][name] = stage
        check.save()
        print(
            f"  {name:<12} {stage['status']:<8} {stage.get('seconds', 0):6.1f} s  {stage.get('note', '')}", flush=True
        )
    trim_log(check.log)
    failed = [n for n, s in check.report["stages"].items() if s["status"] in ("failed", "timeout")]
    check.report["status"] = "failed: " + ", ".join(failed) if failed else "complete"
    check.report["notes"] = {
        n: f"{s['status']}: {s['note']}" for n, s in check.report["stages"].items() if s.get("note")
    }
    check.save()
    check.report["files"] = check_files(out)
    check.save()
    shutil.rmtree(check.work, ignore_errors=True)
    print(
        f"gpu-check {check.report['status']} in {check.report['elapsed_s']:.0f} s; "
        f"files: {check.report['files']['count']} "
        f"({'ok' if check.report['files']['ok'] else 'over the limit'}); {out / 'gpu_check.json'}",
        flush=True,
    )
    return 1 if failed or not check.report["files"]["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())

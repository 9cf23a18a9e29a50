"""The stages of ``bench.py gpu-check`` (``bench.gpu_check``), each ``stage_NAME(check, cap) -> dict``: run in its
own process under a time cap of ``cap`` seconds, it returns ``{"status": passed|failed|timeout|skipped, "note",
"summary", ...}``; ``check`` (a ``bench.gpu_check.Check``) holds the output folder, the work folder, the
staged data and what earlier stages found (CUDA, DALI, the shards written).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import TYPE_CHECKING

from .common import ROOT, installed_versions

if TYPE_CHECKING:
    from .gpu_check import Check

MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20  # the output folder's limits: files, bytes per file
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


def _subprocess_result(result: dict, summary: dict | None = None) -> dict:
    status = "timeout" if result["timed_out"] else "passed" if result["returncode"] == 0 else "failed"
    return {"status": status, **result, "summary": summary or {}}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_environment(check: Check, cap: float) -> dict:
    import torch

    versions = installed_versions(PACKAGES)
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
    command += ["--runs", "1"] + (
        ["--seconds", "0.5", "--batch_size", "16", "--cores", "2"] if check.dry_run else ["--seconds", "6"]
    )
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

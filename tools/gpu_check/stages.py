"""The stages of the GPU check (``python -m tools.gpu_check``) and their table, ``STAGES``.

A stage is one ``Stage`` entry (name, group, cap on the GPU, cap in the dry run, what it needs, what it shows) and a
function ``run(check, cap) -> {"status": passed|failed|timeout|skipped, "note", "summary", ...}`` that runs its work
in a child process under ``cap`` seconds. Heavy work runs in this module's workers
(``python -m tools.gpu_check.stages worker NAME SPEC``), which append one row per case to the check's rows file as it
lands (``rows.emit``); pytest stages append one row per test through the ``tools.gpu_check.rows`` plugin. What the
stages measure is the product's own code (``simclr_dali.bench``: the kernel cases, the pipeline, train and loss
benchmarks); this module adds only the staging and the caps. Adding a stage: a function and one ``Stage(...)`` line
in ``STAGES``, within its group's budget (the dry run and ``--plan`` check the sums, ``plan.GROUP_BUDGET_S``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import typing
from collections.abc import Callable
from pathlib import Path

from simclr_dali.bench.gpu_check import (
    DRY_KERNEL_SIZE,
    default_threads,
    kernel_rows,
    kernel_specialisations,
    pipeline_commands,
)
from simclr_dali.common.files import atomic_write_text

from .check import PIECES, SITE, STAGING, Check
from .rows import append_row, emit

ROOT = Path(__file__).resolve().parents[2]  # the checkout
SHARED_DATA = ROOT.parent / "shared" / "data"
MAX_FILE_BYTES = 16 * 2**20
PACKAGES = (
    "torch",
    "torchvision",
    "triton",
    "timm",
    "accelerate",
    "nvidia-dali-cuda130",
    "nvidia-nvimgcodec-cu13",
    "nvidia-nvjpeg",
    "webdataset",
    "jsonargparse",
    "docstring-parser",
    "numpy",
    "numba",
    "llvmlite",
    "pillow",
    "pytest",
)
RUNS_WITH = (
    "torch",
    "triton",
    "numba",
)  # the device's own versions, recorded and used as they are (no install)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    group: str  # "*": every group (the pieces and the environment)
    cap_s: float  # on the GPU machine
    dry_cap_s: float  # in the dry run (CPU)
    run: Callable
    needs: tuple[str, ...] = ()  # "cuda", "dali", or earlier stages that must have passed
    shows: str = ""
    min_s: float = 15  # skipped when less than min(cap, this) is left


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _worker(check: Check, name: str, cap: float, spec: dict, env: dict | None = None) -> dict:
    """Run worker ``name`` in a child process; its rows land in the rows file as it goes."""
    result = check.run(
        name, _python("-m", "tools.gpu_check.stages", "worker", name, json.dumps(spec)), cap, env
    )
    rows = [r for r in check.stage_rows(name) if r.get("event") == "row"]
    status = (
        "timeout" if result["timed_out"] else "passed" if result["returncode"] == 0 else "failed"
    )
    failed = [r for r in rows if r.get("ok") is False]
    if status == "passed" and failed:
        status = "failed"
    note = f"{len(failed)} of {len(rows)} rows out of tolerance" if failed else None
    if result["timed_out"]:
        note = f"killed at its {cap:.0f} s cap after {len(rows)} rows (kept)"
    return {"status": status, **result, **({"note": note} if note else {})}


def _subprocess_result(result: dict, summary: dict | None = None) -> dict:
    status = (
        "timeout" if result["timed_out"] else "passed" if result["returncode"] == 0 else "failed"
    )
    return {"status": status, **result, "summary": summary or {}}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- pieces (what bench/gpu_stage.sh packs)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


class _Concatenated:
    """A read-only file object over several files in order (the bundle's parts, never joined on disk)."""

    def __init__(self, paths):
        self.paths, self.handle = list(paths), None

    def read(self, size=-1):
        out = b""
        while self.paths or self.handle:
            if self.handle is None:
                self.handle = open(self.paths.pop(0), "rb")
            chunk = self.handle.read(size if size >= 0 else -1)
            if chunk:
                out += chunk
                if size >= 0 and len(out) >= size:
                    return out
                size = size - len(chunk) if size >= 0 else size
            else:
                self.handle.close()
                self.handle = None
        return out


def install_pieces(pieces: Path, staging: Path) -> dict:
    """Install every carried piece under ``pieces`` (each ``pNNN/MANIFEST.json``) into ``staging``; idempotent.

    - "wheels" pieces (the < 1 MiB first-call piece): pip-installed into staging/site.
    - "part" pieces: one part of the xz-compressed bundle (site/ + data/); the part is copied to
      staging/parts after its checksum is checked; when every part is there the bundle is unpacked into staging.
    Returns what is staged and which pieces are missing, by name."""
    site, parts_dir, done = staging / "site", staging / "parts", staging / "done"
    for folder in (site, parts_dir, done):
        folder.mkdir(parents=True, exist_ok=True)
    known, actions = {}, []
    for manifest_path in sorted(pieces.glob("*/MANIFEST.json")) if pieces.is_dir() else []:
        manifest = json.loads(manifest_path.read_text())
        here = manifest_path.parent
        (staging / f"manifest-{manifest['set']}.json").write_text(json.dumps(manifest))
        if manifest["kind"] == "wheels":
            marker = done / f"{here.name}-{manifest['sha256'][:16]}"
            if not marker.exists():
                wheels = sorted(str(p) for p in here.glob("*.whl"))
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "install",
                        "-q",
                        "--no-index",
                        "--no-deps",
                        "--no-compile",
                    ]
                    + ["--no-cache-dir", "--upgrade", "--target", str(site), *wheels],
                    check=True,
                    timeout=120,
                )
                marker.touch()
                actions.append(f"installed {len(wheels)} wheels of {here.name}")
        else:
            part = manifest["parts"][manifest["index"]]
            source, target = here / part["file"], parts_dir / part["file"]
            unpacked = (done / f"{manifest['set']}-{manifest['sha256'][:16]}").exists()
            if not unpacked and not (target.exists() and target.stat().st_size == part["bytes"]):
                if _sha256(source) != part["sha256"]:
                    raise RuntimeError(
                        f"{source}: checksum mismatch (pack again with bench/gpu_stage.sh)"
                    )
                shutil.copyfile(source, target.with_suffix(".copy"))
                os.replace(target.with_suffix(".copy"), target)
                actions.append(f"copied {part['file']}")
    # a bundle whose parts are all here is unpacked once (its manifest can come from an earlier call)
    for manifest_path in sorted(staging.glob("manifest-*.json")):
        manifest = json.loads(manifest_path.read_text())
        known[manifest["set"]] = manifest
        if manifest["kind"] != "parts":
            continue
        marker = done / f"{manifest['set']}-{manifest['sha256'][:16]}"
        files = [parts_dir / p["file"] for p in manifest["parts"]]
        if marker.exists() or not all(f.exists() for f in files):
            continue
        start = time.time()
        with tarfile.open(fileobj=_Concatenated(files), mode="r|xz") as bundle:
            bundle.extractall(staging, filter="data")
        marker.touch()
        for f in files:
            f.unlink()
        actions.append(
            f"unpacked {manifest['set']} ({len(files)} parts) in {time.time() - start:.0f} s"
        )
    staged, missing = [], []
    for name, manifest in known.items():
        if manifest["kind"] == "wheels":
            (
                staged
                if (done / f"{manifest['piece']}-{manifest['sha256'][:16]}").exists()
                else missing
            ).append(manifest["piece"])
            continue
        if (done / f"{name}-{manifest['sha256'][:16]}").exists():
            staged += [p["piece"] for p in manifest["parts"]]
        else:
            for p in manifest["parts"]:
                (staged if (parts_dir / p["file"]).exists() else missing).append(p["piece"])
    return {
        "sets": sorted(known),
        "staged": sorted(staged),
        "missing": sorted(missing),
        "actions": actions,
    }


def stage_pieces(check: Check, cap: float) -> dict:
    if check.dry_run:
        found = (
            sorted(p.parent.name for p in PIECES.glob("*/MANIFEST.json")) if PIECES.is_dir() else []
        )
        return {
            "status": "passed",
            "summary": {"carried": found},
            "note": "dry run: pieces listed, not installed",
        }
    summary = install_pieces(PIECES, STAGING)
    if str(SITE) not in sys.path:
        sys.path.insert(0, str(SITE))  # this process checks DALI's import next (environment)
    emit_row = {"event": "row", "stage": "pieces", **summary}
    append_row(check.rows_path, emit_row)
    if not summary["sets"]:
        note = "no pieces carried or staged: run make gpu-stage here and carry .gpu/simclr/pNNN (bench/GPU_CHECK.md)"
    elif summary["missing"]:
        note = (
            "missing on this machine: " + ", ".join(summary["missing"]) + " (carry them; any order)"
        )
    else:
        note = "all staged: " + ", ".join(summary["staged"])
    return {"status": "passed", "summary": summary, "note": note}


# --------------------------------------------------------------------------- environment


def stage_environment(check: Check, cap: float) -> dict:
    import importlib.util

    import torch

    from simclr_dali.bench.common import installed_versions

    versions = installed_versions(PACKAGES)
    check.cuda = torch.cuda.is_available()
    summary = {
        "versions": versions,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if check.cuda else None,
        "python": sys.version.split()[0],
        "cuda_available": check.cuda,
        "features": {
            "pipeline.colour_gpu": importlib.util.find_spec("simclr_dali.pipeline.colour_gpu")
            is not None,
            "decode choice (TrainConfig)": _literal_field(lambda v: "roi" in v.lower()),
            "colour choice (TrainConfig)": _literal_field(
                lambda v: any(k in v.lower() for k in ("gpu", "triton", "kernel")),
                ("colour", "color"),
            ),
        },
    }
    try:
        import nvidia.dali

        check.dali, summary["dali"] = True, nvidia.dali.__version__
    except ImportError as error:
        summary["dali"] = f"not importable: {error}"
    summary["runs_with"] = {name: versions.get(name, "not installed") for name in RUNS_WITH}
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
    check.report["device"] = (summary.get("gpu") or {}).get("name", "cpu")
    return {"status": "passed", "summary": summary}


def _literal_field(matches, name_has: tuple[str, ...] = ()) -> dict | None:
    """A TrainConfig field typed Literal[...] with a choice that ``matches`` (and a name containing one of
    ``name_has``): {field, choices, default}, or None (issue 23's crop-sampler and colour choices, when they land)."""
    try:
        from simclr_dali.trainer.config import TrainConfig

        hints = typing.get_type_hints(TrainConfig)
    except (
        Exception
    ):  # jsonargparse not staged yet, or the config does not import: no choice to measure
        return None
    for f in dataclasses.fields(TrainConfig):
        choices = [a for a in typing.get_args(hints.get(f.name)) if isinstance(a, str)]
        if typing.get_origin(hints.get(f.name)) is typing.Literal and any(
            matches(c) for c in choices
        ):
            if not name_has or any(k in f.name for k in name_has):
                return {"field": f.name, "choices": choices, "default": f.default}
    return None


# --------------------------------------------------------------------------- the Triton kernels against float64


def worker_kernels(spec: dict) -> None:
    for row in kernel_rows(small=spec["dry_run"]):
        emit(row)


def stage_kernels(check: Check, cap: float) -> dict:
    env = check.env("kernels")
    if check.dry_run:
        env["TRITON_INTERPRET"] = "1"
    stage = _worker(check, "kernels", cap, {"dry_run": check.dry_run}, env)
    stage["summary"] = {"predicted_specialisations": len(kernel_specialisations())}
    if check.dry_run:
        stage["note"] = (
            f"dry run: Triton interpreter at 2N={DRY_KERNEL_SIZE[0]}, d={DRY_KERNEL_SIZE[1]}"
        )
    return stage


# --------------------------------------------------------------------------- ResNet-50 on a synthetic feed

TRAIN_VARIANTS = (("plain", None), ("micro-batches of 64", 64))  # (label, micro_batch) at batch 256


def _train_args(dry_run: bool, shards: str, json_path: Path, feeds: list[str]) -> list[str]:
    args = ["--preset", "imagenet", "--shards", shards, "--json", str(json_path), "--feeds", *feeds]
    if dry_run:
        tiny = {
            "backbone": "resnet18",
            "image_size": 32,
            "timm_kwargs": {"channels": [8, 16, 32, 64]},
        }
        return args + [
            "--batch_size",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--cores",
            "2",
            "--overrides",
            json.dumps(tiny),
        ]
    return args + ["--batch_size", "256", "--steps", "20", "--warmup", "5"]


def _train_row(payload: dict, label: str, overrides: dict | None = None) -> dict:
    import torch

    row = {
        "variant": label,
        "model": payload.get("model"),
        "image_size": payload.get("image_size"),
        "batch_size": payload.get("batch_size"),
        "micro_batch": payload.get("micro_batch"),
        "precision": payload.get("precision"),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        **({"overrides": overrides} if overrides else {}),
        **{
            f"{feed}_images_per_s": round(r["images_per_s"], 1)
            for feed, r in payload.get("results", {}).items()
        },
        **{
            f"{feed}_data_wait": round(r["data_wait_fraction"], 4)
            for feed, r in payload.get("results", {}).items()
        },
    }
    if "pipeline_efficiency" in payload:
        row["pipeline_efficiency"] = round(payload["pipeline_efficiency"], 3)
    if torch.cuda.is_available():
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    return row


def _emit_or_error(label: str, measure) -> None:
    """One row: the measurement, or the error (out of memory, say), so that the next variant still runs."""
    try:
        emit(measure())
    except Exception as error:
        emit(
            {"variant": label, "ok": False, "error": f"{type(error).__name__}: {str(error)[:1500]}"}
        )
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def worker_resnet50(spec: dict) -> None:
    from simclr_dali.bench.train import main as train_main

    for label, micro_batch in TRAIN_VARIANTS:
        args = _train_args(
            spec["dry_run"], spec["shards"], Path(spec["work"]) / "resnet50.json", ["synthetic"]
        )
        if micro_batch:
            args += ["--micro_batch", str(2 if spec["dry_run"] else micro_batch)]
        _emit_or_error(label, lambda a=args, lb=label: _train_row(train_main(a), lb))


def stage_resnet50(check: Check, cap: float) -> dict:
    # the synthetic feed never reads its shards; the config only needs the field set
    spec = {
        "dry_run": check.dry_run,
        "work": str(check.work),
        "shards": str(check.work / "no-shards"),
    }
    stage = _worker(check, "resnet50", cap, spec)
    if check.dry_run:
        stage["note"] = "dry run: a narrow ResNet-18 at 32 px, batch 8, on the CPU"
    return stage


# --------------------------------------------------------------------------- the loss

LOSS_ROWS = (  # (2N, method), most telling first; bfloat16, d = 128 (the presets' projections)
    (8192, "fused"),
    (131072, "fused"),
    (8192, "chunked"),
    (8192, "reference"),
    (131072, "chunked"),
)
DRY_LOSS_ROWS = ((256, "fused"), (256, "chunked"), (256, "reference"))


def worker_loss(spec: dict) -> None:
    from simclr_dali.bench.loss import run

    dry = spec["dry_run"]
    for two_n, method in DRY_LOSS_ROWS if dry else spec.get("rows", LOSS_ROWS):
        (record,) = run(
            [two_n],
            ["float32" if dry else "bfloat16"],
            [method],
            "cpu" if dry else "cuda",
            repeats=1 if dry else 5,
            timeout_s=60 if dry else 600,
            check_max=8192,
        )
        emit(
            {k: v for k, v in record.items() if k != "times_ms"}
            | {"ok": record["status"] != "error"}
        )


def stage_loss(check: Check, cap: float) -> dict:
    stage = _worker(check, "loss", cap, {"dry_run": check.dry_run})
    if check.dry_run:
        stage["note"] = "dry run: 2N=256 float32 on the CPU; the fused Triton kernels need CUDA"
    return stage


def stage_loss_compiled(check: Check, cap: float) -> dict:
    """One cold torch.compile of the reference (minutes on a CPU: 2N=256 there), capped."""
    rows = [[256, "compiled"]] if check.dry_run else [[8192, "compiled"]]
    return _worker(
        check, "loss_compiled", cap, {"dry_run": False, "rows": rows, "cpu": check.dry_run}
    )


def worker_loss_compiled(spec: dict) -> None:
    from simclr_dali.bench.loss import run

    device = "cpu" if spec.get("cpu") else "cuda"
    for two_n, method in spec["rows"]:
        (record,) = run(
            [two_n], ["bfloat16"], [method], device, repeats=3, timeout_s=600, check_max=8192
        )
        emit(
            {k: v for k, v in record.items() if k != "times_ms"}
            | {"ok": record["status"] != "error"}
        )


# --------------------------------------------------------------------------- pytest, one row per test


def summarise_tests(rows: list[dict], result: dict, cap: float) -> dict:
    """A stage entry from the plugin's rows: a killed or crashed pytest is failed, with what finished and what
    was running, however far it got (no JUnit file needed)."""
    order = {"passed": 0, "skipped": 1, "failed": 2}
    collected = next((r["tests"] for r in reversed(rows) if r.get("event") == "collected"), [])
    started = [r["test"] for r in rows if r.get("event") == "start"]
    outcome, messages = {}, {}
    for r in rows:
        if r.get("event") == "result" and order[r["outcome"]] >= order.get(
            outcome.get(r["test"]), -1
        ):
            outcome[r["test"]], messages[r["test"]] = r["outcome"], r.get("message", "")
    running = [t for t in started if t not in outcome]
    by = {k: [t for t, o in outcome.items() if o == k] for k in order}
    summary = {
        "collected": len(collected),
        "passed": len(by["passed"]),
        "failed": len(by["failed"]),
        "skipped": len(by["skipped"]),
        "failures": [{"test": t, "message": messages[t][-500:]} for t in by["failed"]],
        "running_when_stopped": running,
        "not_run": [t for t in collected if t not in started],
        "skipped_tests": [{"test": t, "reason": messages[t][-200:]} for t in by["skipped"]],
    }
    counts = f"{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped"
    if result["timed_out"]:
        status = "timeout"
        note = f"pytest killed at its {cap:.0f} s cap: {counts}; running: {running or 'none'}; "
        note += f"{len(summary['not_run'])} of {len(collected)} not run"
    elif running:
        status, note = "failed", f"pytest died (rc {result['returncode']}) in {running}: {counts}"
    elif summary["failed"]:
        status, note = "failed", counts
    elif result["returncode"] == 5 or not collected:
        status, note = "skipped", f"no tests collected (rc {result['returncode']})"
    elif result["returncode"] != 0:
        status, note = "failed", f"pytest rc {result['returncode']} ({counts}): see output_tail"
    elif not summary["passed"] and summary["skipped"]:
        status, note = (
            "skipped",
            f"no CUDA device: all {summary['skipped']} GPU-marked tests skipped",
        )
    else:
        status, note = "passed", counts
    return {"status": status, "note": note, **result, "summary": summary}


def run_pytest(check: Check, name: str, cap: float, selection: list[str]) -> dict:
    command = _python(
        "-m", "pytest", "-p", "tools.gpu_check.rows", "-p", "no:cacheprovider", "-q", *selection
    )
    result = check.run(name, command, cap)
    return summarise_tests(check.stage_rows(name), result, cap)


# The GPU tests of the torch group (no DALI needed); the data group runs every other GPU test but the Triton group
# (the kernels stage checks the production configurations; tests_all runs the whole group's 100+ specialisations).
TORCH_TESTS = "test_bf16_autocast or test_cuda_events_measure or test_auto_probe_on_cuda or test_global_bn_on_cuda"
TORCH_TEST_FILES = (
    "tests/test_gpu.py",
    "tests/test_microbatch.py",
    "tests/test_profile.py",
)  # import without DALI
TRITON_GROUP = "tests/test_ntxent_triton.py::test_compiled_kernels_cuda"


def stage_tests_torch(check: Check, cap: float) -> dict:
    return run_pytest(
        check, "tests_torch", cap, ["-m", "gpu", "-k", TORCH_TESTS, *TORCH_TEST_FILES]
    )


def stage_tests_dali(check: Check, cap: float) -> dict:
    return run_pytest(
        check,
        "tests_dali",
        cap,
        ["-m", "gpu", "-k", f"not ({TORCH_TESTS})", f"--deselect={TRITON_GROUP}", "tests"],
    )


def stage_tests_all(check: Check, cap: float) -> dict:
    return run_pytest(check, "tests_all", cap, ["-m", "gpu", "tests"])


# --------------------------------------------------------------------------- data, generated on the device

IMAGENET_LIKE = (
    1000  # generated ImageNet-sized JPEGs (x5 in the shards: 5,000 samples, as the sample's x5)
)
CIFAR_LIKE = 10000  # generated 32 px JPEGs, when the CIFAR-10 piece is not staged


def _generate_chunk(args) -> list[tuple[str, int]]:
    import io
    import random

    from PIL import Image

    subset, sizes, start, stop, out, quality = args
    sources = [Image.open(p).convert("RGB") for p in subset]
    written = []
    for i in range(start, stop):
        rng = random.Random(i)
        wnid, width, height = sizes[i % len(sizes)]
        source = sources[i % len(sources)]
        # a random crop of the source with the target's aspect, at 50-100% of the largest such crop
        aspect = width / height
        cw = min(source.width, int(source.height * aspect))
        ch = int(cw / aspect)
        s = rng.uniform(0.5, 1.0) ** 0.5
        cw, ch = max(8, int(cw * s)), max(8, int(ch * s))
        x, y = rng.randint(0, source.width - cw), rng.randint(0, source.height - ch)
        image = source.crop((x, y, x + cw, y + ch)).resize((width, height), Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        path = Path(out) / f"{wnid}_{i:05d}.JPEG"
        path.write_bytes(buffer.getvalue())
        written.append((str(path), len(buffer.getvalue())))
    return written


def generate_imagenet_like(
    subset_dir: Path, out: Path, count: int, workers: int, quality: int = 90
) -> dict:
    """``count`` JPEGs with the ImageNet sample's sizes and classes (subset_dir/sizes.json: [wnid, w, h, bytes]
    per sample image), each a random crop of one of the carried subset images, resized, flipped, re-encoded."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    meta = json.loads((subset_dir / "sizes.json").read_text())
    sizes = [(wnid, w, h) for wnid, w, h, _ in meta]
    subset = [str(p) for p in sorted(subset_dir.glob("*.JPEG"))]
    out.mkdir(parents=True, exist_ok=True)
    step = max(1, count // (4 * workers))
    chunks = [
        (subset, sizes, s, min(count, s + step), str(out), quality) for s in range(0, count, step)
    ]
    # spawned, not forked: a fork must commit the caller's whole address space (ENOMEM in a long test session)
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        written = [w for chunk in pool.map(_generate_chunk, chunks) for w in chunk]
    pixels = sum(sizes[i % len(sizes)][1] * sizes[i % len(sizes)][2] for i in range(count))
    sample_pixels = sum(w * h for _, w, h, _ in meta)
    return {
        "images": len(written),
        "from_subset": len(subset),
        "bytes_per_pixel": round(sum(b for _, b in written) / pixels, 3),
        "sample_bytes_per_pixel": round(sum(b for *_, b in meta) / sample_pixels, 3),
        "quality": quality,
    }


def _cifar_like_shards(subset_dir: Path, out: Path, count: int) -> Path:
    import numpy as np
    from PIL import Image

    from simclr_dali.bench.common import write_ten_class_shards

    rng = np.random.default_rng(0)
    sources = [
        np.asarray(Image.open(p).convert("RGB").resize((128, 96)))
        for p in sorted(subset_dir.glob("*.JPEG"))
    ]
    images = np.empty((count, 32, 32, 3), np.uint8)
    for i in range(count):
        source = sources[i % len(sources)]
        side = int(rng.integers(32, 96))
        y, x = (
            rng.integers(0, source.shape[0] - side + 1),
            rng.integers(0, source.shape[1] - side + 1),
        )
        tile = Image.fromarray(source[y : y + side, x : x + side]).resize((32, 32), Image.BILINEAR)
        images[i] = np.asarray(tile)
    write_ten_class_shards(images, out, max_count=10_000)
    return out


def stage_data(check: Check, cap: float) -> dict:
    from simclr_dali.bench.pipeline import imagenet_shards, synthetic_shards

    data = check.work / "data"
    if check.dry_run:
        check.shards["imagenet"], _ = synthetic_shards(data / "imagenet", 64, 96, "generated")
        check.shards["cifar_train"], _ = synthetic_shards(
            data / "cifar" / "train", 96, 32, "generated"
        )
        check.shards["cifar_test"], _ = synthetic_shards(
            data / "cifar" / "test", 48, 32, "generated"
        )
        return {
            "status": "passed",
            "summary": {k: str(v) for k, v in check.shards.items()},
            "note": "dry run: tiny shards",
        }
    subset = STAGING / "data" / "imagenet-subset"
    if not (subset / "sizes.json").exists():
        return {
            "status": "failed",
            "note": f"no ImageNet subset at {subset}: its bundle part is missing (pieces)",
        }
    workers = min(16, len(os.sched_getaffinity(0)))
    summary = {
        "imagenet_like": generate_imagenet_like(
            subset, data / "imagenet-like", IMAGENET_LIKE, workers
        )
    }
    check.shards["imagenet"], _ = imagenet_shards(
        5, source=data / "imagenet-like", out=data / "imagenet-like-x5"
    )
    cifar = STAGING / "data" / "cifar10-shards.tar.gz"
    if cifar.exists():
        with tarfile.open(cifar) as bundle:
            bundle.extractall(data, filter="data")
        check.shards["cifar_train"], check.shards["cifar_test"] = (
            data / "cifar10" / "train",
            data / "cifar10" / "test",
        )
        summary["cifar"] = "CIFAR-10 shards (staged piece)"
    else:
        check.shards["cifar_train"] = _cifar_like_shards(subset, data / "cifar-like", CIFAR_LIKE)
        summary["cifar"] = (
            f"{CIFAR_LIKE} generated 32 px JPEGs (the CIFAR-10 piece is not staged: no cifar10 stage)"
        )
    emit_path = check.rows_path
    append_row(emit_path, {"stage": "data", "event": "row", **summary})
    return {"status": "passed", "summary": summary | {k: str(v) for k, v in check.shards.items()}}


# --------------------------------------------------------------------------- DALI: training feed, pipeline, profile


def _train_dali_variants() -> list[tuple[str, dict]]:
    """The default config, then each other choice of issue 23's decode (ROI decode vs decode-then-crop) and colour
    (the GPU colour kernel) fields, when TrainConfig has them: one measured row each."""
    variants = [("default", {})]
    for label, found in (
        ("decode", _literal_field(lambda v: "roi" in v.lower())),
        (
            "colour",
            _literal_field(
                lambda v: any(k in v.lower() for k in ("gpu", "triton", "kernel")),
                ("colour", "color"),
            ),
        ),
    ):
        if found:
            variants += [
                (f"{label}: {c}", {found["field"]: c})
                for c in found["choices"]
                if c != found["default"]
            ]
    return variants


def worker_train_dali(spec: dict) -> None:
    from simclr_dali.bench.train import main as train_main

    for i, (label, overrides) in enumerate(_train_dali_variants()):
        args = _train_args(
            spec["dry_run"],
            spec["shards"],
            Path(spec["work"]) / "train_dali.json",
            ["synthetic", "dali"] if i == 0 else ["dali"],
        )
        if overrides:
            base = json.loads(args[args.index("--overrides") + 1]) if "--overrides" in args else {}
            if "--overrides" in args:
                del args[args.index("--overrides") : args.index("--overrides") + 2]
            args += ["--overrides", json.dumps(base | overrides)]
        _emit_or_error(
            label, lambda a=args, lb=label, o=overrides: _train_row(train_main(a), lb, o)
        )


def stage_train_dali(check: Check, cap: float) -> dict:
    spec = {
        "dry_run": check.dry_run,
        "work": str(check.work),
        "shards": str(check.shards["imagenet"]),
    }
    stage = _worker(check, "train_dali", cap, spec)
    stage["summary"] = {"variants": [label for label, _ in _train_dali_variants()]}
    return stage


def _pipeline_rows(saved: dict) -> list[dict]:
    """One row per preset and DALI thread count of a ``bench.py pipeline`` result (either form of its sweep)."""
    rows = []
    for name, r in saved.get("results", {}).items():
        for run in r.get("runs", []):
            tv = run["torchvision"]["images_per_s"]
            # bench.py pipeline --threads A B ...: one DALI result per thread count (dali_by_threads); else one
            by_threads = run.get("dali_by_threads") or {
                run.get("dali_threads", r.get("dali_threads")): run["dali"]
            }
            for threads, dali in by_threads.items():
                rows.append(
                    {
                        "preset": name,
                        "dali_threads": None if threads is None else int(threads),
                        "dali_images_per_s": round(dali["images_per_s"], 1),
                        "torchvision_images_per_s": round(tv, 1),
                        "speedup": round(dali["images_per_s"] / tv, 3),
                    }
                )
    return rows


def stage_pipeline(check: Check, cap: float) -> dict:
    """``bench.py pipeline --device cuda`` over a DALI threads sweep, the GPU graphs of both presets against
    torchvision; the rows of every thread count in one pipeline.json."""
    base = ["--device", "cpu" if check.dry_run else "cuda", "--runs", "1"]
    base += [
        "--imagenet_shards",
        str(check.shards["imagenet"]),
        "--cifar_shards",
        str(check.shards["cifar_train"]),
    ]
    base += ["--seconds", "0.5", "--batch_size", "16"] if check.dry_run else ["--seconds", "2"]
    commands = pipeline_commands(base, [1, 2] if check.dry_run else default_threads())
    results, rows, start = [], [], time.time()
    for k, argv in enumerate(commands):
        json_path = check.work / f"pipeline_{k}.json"
        left = cap - (time.time() - start)
        result = check.run(
            "pipeline", _python("bench.py", "pipeline", *argv, "--json", str(json_path)), left
        )
        saved = _read_json(json_path) or {}
        results.append({"argv": argv, **saved})
        rows += _pipeline_rows(saved)
        if result["returncode"] != 0 or result["timed_out"]:
            break
    for row in rows:
        append_row(check.rows_path, {"stage": "pipeline", "event": "row", **row})
    atomic_write_text(check.out / "pipeline.json", json.dumps({"sweep": results}, indent=1) + "\n")
    return _subprocess_result(result, {"rows": rows, "commands": len(commands)})


def worker_dali_graphs(spec: dict) -> None:
    """DALI's numba plugin first, then each preset's training graph built on the device and one batch taken: a
    row per preset with the seconds to the first batch (the graph's build included)."""
    import torch

    from simclr_dali.bench.gpu_check import import_numba_plugin
    from simclr_dali.bench.pipeline import PRESETS, loader

    plugin = import_numba_plugin()
    emit({"case": "nvidia.dali.plugin.numba", "ok": plugin.startswith("ok"), "import": plugin})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, preset in PRESETS.items():
        shards = spec["shards"]["imagenet" if not preset["cifar"] else "cifar_train"]
        start = time.perf_counter()
        try:
            batches = loader(Path(shards), {**preset, "batch_size": 16}, "dali", 2, device)
            batch = next(iter(batches))
            parts = batch.items() if isinstance(batch, dict) else enumerate(batch)
            shapes = {str(k): list(getattr(v, "shape", ())) for k, v in parts}
            emit(
                {
                    "case": name,
                    "device": device,
                    "ok": True,
                    "first_batch_s": round(time.perf_counter() - start, 2),
                    "shapes": shapes,
                }
            )
        except Exception as error:  # recorded; the next preset still builds
            emit(
                {
                    "case": name,
                    "device": device,
                    "ok": False,
                    "error": f"{type(error).__name__}: {str(error)[:1500]}",
                }
            )


def stage_dali_graphs(check: Check, cap: float) -> dict:
    spec = {"shards": {k: str(v) for k, v in check.shards.items()}}
    return _worker(check, "dali_graphs", cap, spec)


def stage_profile(check: Check, cap: float) -> dict:
    trace_dir, out = check.work / "trace", check.out / "profile.json"
    command = _python("bench.py", "profile", "--config", "configs/imagenet.yaml")
    command += [
        "--train_shards",
        str(check.shards["imagenet"]),
        "--trace_dir",
        str(trace_dir),
        "--json",
        str(out),
    ]
    command += ["--output_dir", str(check.work / "profile_run")]
    if check.dry_run:
        command += [
            "--backbone",
            "resnet18",
            "--timm_kwargs",
            '{"channels": [8, 16, 32, 64]}',
            "--image_size",
            "32",
        ]
        command += [
            "--batch_size",
            "8",
            "--precision",
            "no",
            "--data_threads",
            "2",
            "--warmup_steps",
            "1",
        ]
        command += ["--profile_steps", "2", "--pipeline_seconds", "0.5"]
    else:
        command += [
            "--batch_size",
            "256",
            "--warmup_steps",
            "5",
            "--profile_steps",
            "5",
            "--pipeline_seconds",
            "3",
        ]
    result = check.run("profile", command, cap)
    saved = _read_json(out) or {}
    summary = {}
    if saved:
        rank = saved["per_rank"][0]
        summary = {
            "verdict": saved["verdict"]["line"],
            "images_per_s": round(rank["images_per_s"], 1),
            "stages_ms": {row["name"]: round(row["mean_ms"], 2) for row in rank["table"]["stages"]},
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
        stage["status"], note = (
            "failed",
            "no GPU utilisation read from the trace (no kernels in it?)",
        )
    return stage | ({"note": note} if note else {})


def stage_cifar10(check: Check, cap: float) -> dict:
    if "cifar_test" not in check.shards:
        return {
            "status": "skipped",
            "note": "the CIFAR-10 piece is not staged (make gpu-stage WITH_CIFAR=1)",
        }
    out, run_dir = check.out / "cifar10.json", check.work / "cifar10_run"
    command = _python(
        "train.py",
        "--config",
        "configs/cifar10.yaml",
        "--train_shards",
        str(check.shards["cifar_train"]),
    )
    command += [
        "--eval_train_shards",
        str(check.shards["cifar_train"]),
        "--eval_val_shards",
        str(check.shards["cifar_test"]),
    ]
    command += [
        "--eval_every_epochs",
        "1",
        "--eval_json",
        str(out),
        "--output_dir",
        str(run_dir),
        "--tracker",
        "none",
    ]
    command += ["--checkpoint_every", "null"]
    if check.dry_run:
        command += [
            "--timm_kwargs",
            '{"channels": [8, 16, 32, 64]}',
            "--proj_hidden",
            "32",
            "--batch_size",
            "16",
        ]
        command += [
            "--epochs",
            "1",
            "--warmup_epochs",
            "0.5",
            "--precision",
            "no",
            "--eval_knn_k",
            "5",
        ]
        command += ["--data_threads", "2", "--log_every", "2"]
    else:  # a 30-epoch schedule cut by the time left (half trains, half evaluates): the first epochs of a real run
        minutes = min(2.0, max(0.25, cap / 2 / 60))
        command += [
            "--epochs",
            "30",
            "--warmup_epochs",
            "2",
            "--max_train_minutes",
            f"{minutes:.2f}",
        ]
    result = check.run("cifar10", command, cap)
    saved, trained = _read_json(out) or {}, _read_json(run_dir / "train_summary.json") or {}
    history = saved.get("history", [])
    summary = {
        "knn_top1_by_epoch": [(round(h["epoch"], 2), round(h["knn_top1"], 2)) for h in history],
        **{
            k: trained[k]
            for k in ("steps", "train_seconds", "mean_images_per_s", "data_wait_fraction")
            if k in trained
        },
    }
    stage = _subprocess_result(result, summary)
    if stage["status"] == "passed" and len(history) < 2:
        stage["status"], stage["note"] = (
            "failed",
            f"{len(history)} kNN evaluation(s): expected one per epoch and one at the start",
        )
    return stage


# --------------------------------------------------------------------------- the table

ALWAYS = ("pieces", "environment")
STAGES = (
    Stage(
        "pieces", "*", 30, 10, stage_pieces, shows="the carried pieces installed; which are missing"
    ),
    Stage(
        "environment",
        "*",
        10,
        20,
        stage_environment,
        shows="versions (torch, Triton, numba: run as found), GPU",
    ),
    # group data, first: the call that brings the bundle's last part; the data path before anything else
    Stage(
        "data",
        "data",
        20,
        30,
        stage_data,
        ("dali",),
        "ImageNet-sized JPEGs generated from the subset",
    ),
    Stage(
        "dali_graphs",
        "data",
        20,
        60,
        stage_dali_graphs,
        ("data", "dali"),
        "numba plugin; GPU graph per preset",
    ),
    Stage(
        "pipeline",
        "data",
        50,
        240,
        stage_pipeline,
        ("data", "dali"),
        "DALI vs torchvision, DALI threads sweep",
    ),
    Stage(
        "tests_dali",
        "data",
        30,
        90,
        stage_tests_dali,
        ("dali",),
        "DALI GPU augmentation statistics, train.py",
    ),
    Stage(
        "train_dali",
        "data",
        35,
        180,
        stage_train_dali,
        ("data", "dali"),
        "DALI feed vs synthetic; issue 23 choices",
    ),
    Stage(
        "profile",
        "data",
        30,
        180,
        stage_profile,
        ("data", "dali"),
        "stage table, GPU utilisation, trace",
    ),
    # group torch, second: no DALI needed
    Stage(
        "kernels",
        "torch",
        45,
        120,
        stage_kernels,
        ("cuda",),
        "Triton vs float64, production configs",
    ),
    Stage(
        "tests_torch",
        "torch",
        55,
        90,
        stage_tests_torch,
        (),
        "bf16 autocast, global BN, step timer, probe",
    ),
    Stage(
        "resnet50",
        "torch",
        55,
        180,
        stage_resnet50,
        ("cuda",),
        "ResNet-50 images/s, batch 256, micro-batches",
    ),
    Stage(
        "loss",
        "torch",
        35,
        120,
        stage_loss,
        ("cuda",),
        "fused/chunked/reference ms at 2N 8,192 and 131,072",
    ),
    # group extra: a later session, or the time a plan leaves over
    Stage(
        "loss_compiled",
        "extra",
        60,
        90,
        stage_loss_compiled,
        ("cuda",),
        "one cold torch.compile, capped",
    ),
    Stage(
        "tests_all",
        "extra",
        230,
        120,
        stage_tests_all,
        (),
        "every GPU test (the Triton group's 100+ compiles)",
    ),
    Stage(
        "cifar10",
        "extra",
        150,
        300,
        stage_cifar10,
        ("data", "dali"),
        "CIFAR-10 kNN by epoch (its piece)",
        60,
    ),
)
WORKERS = {
    "dali_graphs": worker_dali_graphs,
    "kernels": worker_kernels,
    "resnet50": worker_resnet50,
    "loss": worker_loss,
    "loss_compiled": worker_loss_compiled,
    "train_dali": worker_train_dali,
}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "worker" or argv[1] not in WORKERS:
        print(
            f"usage: python -m tools.gpu_check.stages worker {{{','.join(WORKERS)}}} SPEC_JSON",
            file=sys.stderr,
        )
        return 2
    WORKERS[argv[1]](json.loads(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

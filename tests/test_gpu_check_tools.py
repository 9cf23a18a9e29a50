"""The GPU check of a lent session (tools/gpu_check, bench/GPU_CHECK.md) without a GPU: its device-time plan, the data
path first, rows that survive a kill, a killed pytest reported as failed, and the dry run of every stage."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from conftest import ROOT, SHARED_DATA, build_wheel

from simclr_dali.bench import gpu_check as product_check
from tools.gpu_check import __main__ as gpu_main
from tools.gpu_check import check as gpu_state
from tools.gpu_check import plan as gpu_plan
from tools.gpu_check import stages as gpu_stages


def test_the_stage_table_fits_the_device_time_and_an_oversized_cap_is_refused(monkeypatch, capsys):
    plan = gpu_plan.check_plan(gpu_stages.STAGES)
    assert plan["total_s"] <= gpu_plan.DEVICE_BUDGET_S == 900
    for group, g in plan["groups"].items():
        assert g["sum_caps_s"] <= g["budget_s"], group
    assert gpu_main.main(["--plan"]) == 0 and "total (of 900 s)" in capsys.readouterr().out
    # one stage 60 s over: its group no longer fits, and the dry run refuses to start
    bigger = tuple(
        dataclasses.replace(s, cap_s=s.cap_s + 60) if s.name == "loss" else s
        for s in gpu_stages.STAGES
    )
    with pytest.raises(gpu_plan.PlanError, match="group 'torch'"):
        gpu_plan.check_plan(bigger)
    monkeypatch.setattr(gpu_stages, "STAGES", bigger)
    assert gpu_main.main(["--dry_run", "--out", "/nonexistent/never-written"]) == 2
    assert "does not fit" in capsys.readouterr().err
    # a plan of more parts than the session can bring is refused too
    with pytest.raises(gpu_plan.PlanError, match="device time"):
        gpu_plan.check_plan(gpu_stages.STAGES, parts=12)


def test_the_kernel_check_compiles_at_most_twelve_triton_specialisations():
    assert (
        len(product_check.kernel_specialisations())
        <= product_check.KERNEL_SPECIALISATIONS_MAX
        == 12
    )
    dtypes = {case[0] for case in product_check.KERNEL_CASES}
    assert {"bfloat16", "float32"} <= dtypes and any(
        case[3] >= 131072 for case in product_check.KERNEL_CASES
    )


def test_the_data_path_comes_first():
    """Issue 29: the plan's first measuring call is the data group, whose first stages build the GPU graphs (after
    DALI's numba plugin) and sweep the pipeline's DALI threads; the torch group comes after; the default group is
    the data one; the environment records the device's own torch, Triton and numba."""
    assert gpu_plan.PLANNED_GROUPS == ("data", "torch")
    calls = list(gpu_plan.check_plan(gpu_stages.STAGES)["calls"])
    data_call = next(i for i, c in enumerate(calls) if "group 'data'" in c)
    torch_call = next(i for i, c in enumerate(calls) if "group 'torch'" in c)
    assert data_call < torch_call and all("bundle part" in c for c in calls[1:data_call])
    order = [s.name for s in gpu_stages.STAGES if s.group in ("data", "torch")]
    assert order[:3] == ["data", "dali_graphs", "pipeline"]
    assert max(order.index(s.name) for s in gpu_stages.STAGES if s.group == "data") < min(
        order.index(s.name) for s in gpu_stages.STAGES if s.group == "torch"
    )
    assert gpu_main.parse([], gpu_stages.STAGES).group == "data"
    selected = gpu_main.select(
        gpu_main.parse([], gpu_stages.STAGES), gpu_stages.STAGES, gpu_stages.ALWAYS
    )
    assert [s.name for s in selected][:5] == [
        "pieces",
        "environment",
        "data",
        "dali_graphs",
        "pipeline",
    ]
    assert set(gpu_stages.RUNS_WITH) == {"torch", "triton", "numba"} <= set(gpu_stages.PACKAGES)


def test_the_pipeline_sweep_passes_every_thread_count():
    """Either form of the sweep (bench.py pipeline --threads, or one call per --cores) covers every count."""
    commands = product_check.pipeline_commands(["--device", "cuda"], [4, 8, 16])
    if len(commands) == 1:
        assert commands[0][-4:] == ["--threads", "4", "8", "16"]
    else:
        assert [c[c.index("--cores") + 1] for c in commands] == ["4", "8", "16"]
    assert all(c[:2] == ["--device", "cuda"] for c in commands)
    assert product_check.default_threads() and max(product_check.default_threads()) <= len(
        os.sched_getaffinity(0)
    )


STAGING_MARKERS = (
    "DEVICE_BUDGET_S",
    "MACHINE_START_S",
    "CALL_OVERHEAD_S",
    "GROUP_BUDGET_S",
    "install_pieces",
    "/tmp/stage",
)


def test_the_wheel_holds_no_gpu_check_staging(tmp_path):
    """The device-lending tooling stays in the checkout: no tools/ module and no file whose text carries the
    staging or the device-time plan in the wheel; the user's command (bench/gpu_check.py) is there."""
    import zipfile

    with zipfile.ZipFile(build_wheel(tmp_path)) as archive:
        names = archive.namelist()
        texts = {
            n: archive.read(n).decode(errors="replace") for n in names if n.endswith((".py", ".sh"))
        }
    assert "simclr_dali/bench/gpu_check.py" in names
    assert not [
        n
        for n in names
        if "/tools/" in n or n.rsplit("/", 1)[-1] in ("gpu_stages.py", "gpu_rows.py")
    ]
    assert not [n for n in names if n.endswith(".sh")]
    carrying = {n: [m for m in STAGING_MARKERS if m in t] for n, t in texts.items()}
    assert {n: m for n, m in carrying.items() if m} == {}
    # the markers do find the staging code (a marker list that matched nothing would pass the test above)
    staging = "".join(
        (ROOT / "tools" / "gpu_check" / f).read_text() for f in ("plan.py", "check.py", "stages.py")
    )
    assert all(m in staging for m in STAGING_MARKERS)


def test_the_users_gpu_check_refuses_a_machine_without_cuda():
    result = subprocess.run(
        [sys.executable, "bench.py", "gpu-check"],
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        result.returncode == 2 and "no CUDA device" in result.stderr and "--small" in result.stderr
    )


@pytest.mark.slow
def test_the_users_gpu_check_runs_its_three_parts_small_on_the_cpu(tmp_path):
    """simclr-bench gpu-check --small: the data path (numba plugin, both presets' graphs timed), every kernel case
    against float64 under the Triton interpreter, the synthetic-feed throughput; one JSON."""
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [
            sys.executable,
            "bench.py",
            "gpu-check",
            "--small",
            "--seconds",
            "0.5",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["parts"]) == ["data", "kernels", "throughput"]  # the data path first
    assert report["parts"]["data"]["numba_plugin"].startswith("ok")
    (run,) = report["parts"]["data"]["runs"]
    assert set(run["results"]) == {"imagenet224", "cifar32"}
    assert (
        len(report["parts"]["kernels"]) == len(product_check.KERNEL_CASES) and report["kernels_ok"]
    )
    assert report["parts"]["throughput"]["results"]["synthetic"]["images_per_s"] > 0


def _read_report(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_a_check_killed_mid_stage_keeps_the_rows_that_landed(tmp_path):
    """SIGKILL to the whole check while the loss stage runs: the rows it finished are in gpu_check.json and
    gpu_check.jsonl (no end-of-stage write needed)."""
    out = tmp_path / "check"
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.gpu_check", "--dry_run", "--only", "loss", "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline, rows = time.time() + 240, []
        while time.time() < deadline and not rows:
            time.sleep(0.5)
            report = _read_report(out / "gpu_check.json") or {}
            rows = [
                r
                for r in report.get("stages", {}).get("loss", {}).get("rows", [])
                if r.get("event") == "row"
            ]
        assert rows, "no loss row landed in gpu_check.json"
        assert process.poll() is None, (
            "the check finished before it could be killed: not a mid-stage kill"
        )
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    report = _read_report(out / "gpu_check.json")
    assert report["status"] == "running" and report["stages"]["loss"]["status"] == "running"
    assert report["stages"]["environment"]["status"] == "passed"
    saved = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    loss_rows = [r for r in saved if r["stage"] == "loss" and r["event"] == "row"]
    assert loss_rows[: len(rows)] == rows
    assert {"method", "two_n", "status"} <= set(loss_rows[0])


def _check(tmp_path):
    args = SimpleNamespace(out=str(tmp_path / "out"), dry_run=True, budget_s=120.0)
    return gpu_state.start_check(args, "torch")


def test_a_pytest_killed_at_its_cap_is_reported_failed_with_what_finished(tmp_path):
    tests = tmp_path / "test_sleeper.py"
    tests.write_text(
        "import time, pytest\n"
        "def test_passes():\n    pass\n"
        "def test_skips():\n    pytest.skip('not here')\n"
        "def test_fails():\n    assert 1 == 2\n"
        "def test_hangs():\n    time.sleep(600)\n"
        "def test_never_reached():\n    pass\n"
    )
    check = _check(tmp_path)
    stage = gpu_stages.run_pytest(check, "tests_probe", 12, [str(tests)])
    summary = stage["summary"]
    assert stage["status"] == "timeout" and stage["timed_out"]
    assert (summary["collected"], summary["passed"], summary["failed"], summary["skipped"]) == (
        5,
        1,
        1,
        1,
    )
    assert [t.split("::")[1] for t in summary["running_when_stopped"]] == ["test_hangs"]
    assert [t.split("::")[1] for t in summary["not_run"]] == ["test_never_reached"]
    assert "killed at its 12 s cap" in stage["note"] and "1 of 5 not run" in stage["note"]
    check.report["stages"]["tests_probe"] = stage
    assert gpu_state.finish_check(check) == 1
    assert _read_report(check.out / "gpu_check.json")["status"] == "failed: tests_probe"


def test_a_pytest_that_dies_mid_test_is_failed_not_clean(tmp_path):
    tests = tmp_path / "test_crash.py"
    tests.write_text("import os\ndef test_passes():\n    pass\ndef test_dies():\n    os._exit(3)\n")
    stage = gpu_stages.run_pytest(_check(tmp_path), "tests_probe", 60, [str(tests)])
    assert stage["status"] == "failed" and not stage["timed_out"]
    assert stage["summary"]["passed"] == 1 and stage["summary"]["running_when_stopped"][0].endswith(
        "test_dies"
    )


def test_the_pieces_install_in_any_order_and_say_what_is_missing(tmp_path):
    """Two parts of an xz bundle and a wheel-less 'wheels' piece: one part alone is reported missing the other;
    both unpack it once; a second install changes nothing."""
    import hashlib
    import io
    import lzma
    import tarfile

    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w") as bundle:
        data = os.urandom(3000)
        info = tarfile.TarInfo("site/probe/data.bin")
        info.size = len(data)
        bundle.addfile(info, io.BytesIO(data))
    packed = lzma.compress(payload.getvalue())
    halves = [packed[: len(packed) // 2], packed[len(packed) // 2 :]]
    pieces, staging = tmp_path / "pieces", tmp_path / "stage"
    parts = [
        {
            "piece": f"p{i:03d}",
            "file": f"bundle.part{i}",
            "bytes": len(h),
            "sha256": hashlib.sha256(h).hexdigest(),
        }
        for i, h in enumerate(halves)
    ]
    manifest = {
        "set": "bundle",
        "kind": "parts",
        "sha256": hashlib.sha256(packed).hexdigest(),
        "parts": parts,
    }
    for i, half in enumerate(halves):
        folder = pieces / f"p{i:03d}"
        folder.mkdir(parents=True)
        (folder / parts[i]["file"]).write_bytes(half)
        (folder / "MANIFEST.json").write_text(json.dumps(manifest | {"index": i}))
    only_second = tmp_path / "second"
    only_second.mkdir()
    (pieces / "p001").rename(only_second / "p001")
    first = gpu_stages.install_pieces(only_second, staging)
    assert first["missing"] == ["p000"] and first["staged"] == ["p001"]
    (only_second / "p001").rename(pieces / "p001")
    both = gpu_stages.install_pieces(pieces, staging)
    assert both["missing"] == [] and both["staged"] == ["p000", "p001"]
    assert (staging / "site" / "probe" / "data.bin").read_bytes() == data
    again = gpu_stages.install_pieces(pieces, staging)
    assert (
        again["missing"] == []
        and again["actions"] == []
        and not list((staging / "parts").iterdir())
    )


BLOCK_DALI = """import sys
class _NoDali:
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ImportError("no DALI on the first device call")
sys.meta_path.insert(0, _NoDali())
"""


def test_the_torch_group_needs_no_dali(tmp_path):
    """What the torch group runs imports without DALI (a rerun on a fresh machine has none staged): the workers'
    modules and the GPU tests it selects."""
    (tmp_path / "sitecustomize.py").write_text(BLOCK_DALI)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    code = (
        "import sys, tools.gpu_check.__main__, tools.gpu_check.stages, simclr_dali.bench.gpu_check, "
        "simclr_dali.bench.train, simclr_dali.bench.loss, simclr_dali.model.ntxent, simclr_dali.trainer.step, "
        "simclr_dali.trainer.build, simclr_dali.trainer.optim\n"
        "try:\n    import nvidia.dali\nexcept ImportError:\n    print('blocked')"
    )
    probe = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "blocked", probe.stderr[-2000:]
    selection = ["-m", "gpu", "-k", gpu_stages.TORCH_TESTS, *gpu_stages.TORCH_TEST_FILES]
    collect = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--collect-only",
            *selection,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert collect.returncode == 0, collect.stdout[-2000:]
    assert "4 tests collected" in collect.stdout or "4/" in collect.stdout, collect.stdout[-2000:]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage_and_says_what_needs_cuda(tmp_path):
    """The check end to end on the CPU at tiny sizes, every stage of both planned groups and cifar10: it cannot
    rot between GPU loans."""
    out = tmp_path / "gpu-check"
    stages = [
        "kernels",
        "tests_torch",
        "resnet50",
        "loss",
        "data",
        "dali_graphs",
        "tests_dali",
        "train_dali",
        "pipeline",
    ]
    stages += ["profile", "cifar10"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.gpu_check",
            "--dry-run",
            "--only",
            *stages,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["status"] == "complete" and report["dry_run"]
    statuses = {name: stage["status"] for name, stage in report["stages"].items()}
    assert statuses == {
        "pieces": "passed",
        "environment": "passed",
        **dict.fromkeys(stages, "passed"),
    } | {
        "tests_torch": "skipped",
        "tests_dali": "skipped",
    }
    for name in ("tests_torch", "tests_dali"):
        tests = report["stages"][name]
        assert tests["note"].startswith("no CUDA device") and tests["summary"]["failed"] == 0
    dali_tests = report["stages"]["tests_dali"]["summary"]
    assert dali_tests["skipped"] >= 10 and any(
        "test_augment" in t["test"] for t in dali_tests["skipped_tests"]
    )
    graphs = [r for r in report["stages"]["dali_graphs"]["rows"] if r["event"] == "row"]
    assert graphs[0]["case"] == "nvidia.dali.plugin.numba" and all(r["ok"] for r in graphs)
    assert [r["case"] for r in graphs[1:]] == ["imagenet224", "cifar32"]
    assert set(report["stages"]["environment"]["summary"]["runs_with"]) == {
        "torch",
        "triton",
        "numba",
    }
    pipeline_rows = report["stages"]["pipeline"]["summary"]["rows"]
    assert {(r["preset"], r["dali_threads"]) for r in pipeline_rows} >= {
        ("imagenet224", 1),
        ("cifar32", 2),
    }
    kernels = [r for r in report["stages"]["kernels"]["rows"] if r["event"] == "row"]
    assert len(kernels) == len(product_check.KERNEL_CASES) and all(r["ok"] for r in kernels)
    loss = {(r["method"], r["status"]) for r in report["stages"]["loss"]["rows"]}
    assert {("fused", "skipped"), ("chunked", "ok"), ("reference", "ok")} <= loss
    resnet = [r for r in report["stages"]["resnet50"]["rows"] if r["event"] == "row"]
    assert [r["variant"] for r in resnet] == [label for label, _ in gpu_stages.TRAIN_VARIANTS]
    assert all(r["synthetic_images_per_s"] > 0 for r in resnet)
    assert report["stages"]["train_dali"]["rows"][0]["dali_images_per_s"] > 0
    assert len(report["stages"]["cifar10"]["summary"]["knn_top1_by_epoch"]) >= 2
    assert report["stages"]["profile"]["summary"]["verdict"].split(":")[0] in (
        "input-bound",
        "compute-bound",
    )
    assert report["files"]["ok"] and report["files"]["count"] <= 8
    for name in (
        "gpu_check.jsonl",
        "gpu_check.log",
        "pipeline.json",
        "profile.json",
        "cifar10.json",
    ):
        assert (out / name).stat().st_size > 0, name


@pytest.mark.skipif(
    not (SHARED_DATA / "imagenet-sample").is_dir(), reason="needs ../shared/data/imagenet-sample"
)
def test_imagenet_sized_jpegs_are_generated_from_a_small_subset(tmp_path):
    """The data stage's generator: the sample's sizes and classes, distinct JPEGs, from a few carried images."""
    from PIL import Image

    subset = tmp_path / "subset"
    subset.mkdir()
    files = sorted((SHARED_DATA / "imagenet-sample").glob("*.JPEG"))
    meta = [[f.stem.split("_", 1)[0], *Image.open(f).size, f.stat().st_size] for f in files[:30]]
    (subset / "sizes.json").write_text(json.dumps(meta))
    for f in files[:4]:
        (subset / f.name).write_bytes(f.read_bytes())
    summary = gpu_stages.generate_imagenet_like(subset, tmp_path / "out", 12, workers=2)
    written = sorted((tmp_path / "out").glob("*.JPEG"))
    assert summary["images"] == len(written) == 12 and summary["from_subset"] == 4
    for i, path in enumerate(sorted(written, key=lambda p: int(p.stem.rsplit("_", 1)[1]))):
        wnid, width, height, _ = meta[i]
        assert path.name.startswith(wnid) and Image.open(path).size == (width, height)
    assert len({p.read_bytes() for p in written}) == 12  # no two alike, even from the same source
    assert 0.1 < summary["bytes_per_pixel"] < 2
    shards = gpu_stages._cifar_like_shards(subset, tmp_path / "cifar", 50)
    assert (shards / "classes.json").exists() and list(shards.glob("train-*.tar"))

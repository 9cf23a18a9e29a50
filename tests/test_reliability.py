"""Issue 30: nothing lost, nothing silently wrong. One fault matrix per class of defect the adversarial pass
found: stale shard indexes, damaged checkpoints and exports, concurrent runs, orphaned children, full disks,
decompression bombs, interrupted rotations, hostile member names. Each test injects the fault into real
files (real tars, real checkpoints of tiny real runs, a real full tmpfs where this user may mount one) and
checks the exit status and that the message names the file at fault."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import yaml
from conftest import ROOT, make_shards, tiny
from PIL import Image

import simclr_dali.trainer.checkpoint as checkpoint_module
from simclr_dali import evaluate, train
from simclr_dali.pipeline.loader import DaliLoader, TwoViews
from simclr_dali.pipeline.shards.shardset import (
    MAX_IMAGE_PIXELS,
    ShardError,
    check_index_matches,
    index_path,
    index_text,
    read_index,
    write_index,
)
from simclr_dali.pipeline.shards.verify import verify_shard
from simclr_dali.pipeline.shards.writer import ShardWriter
from simclr_dali.trainer import export

TINY = tiny(max_steps=2)


def run_train(out: Path, shards, *flags, **overrides) -> int:
    config = out.parent / f"{out.name}.yaml"
    config.write_text(
        yaml.safe_dump({**TINY, "train_shards": str(shards), "output_dir": str(out), **overrides})
    )
    return train.main(["--config", str(config), *map(str, flags)])


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    directory, _ = make_shards(
        tmp_path_factory.mktemp("reliability"), 70, num_classes=12, per_shard=30
    )
    return directory


def copy_set(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "shards"
    shutil.copytree(source, target)
    return target


# --------------------------------------------------------------------------- 1. stale, shorter, longer, foreign .idx


def _rewrite_reordered(tar: Path) -> None:
    """The same members in another sample order: a tar of exactly the same size whose offsets all moved."""
    with tarfile.open(tar) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    samples: dict[str, list] = {}
    for member, data in members:
        samples.setdefault(member.name.split(".", 1)[0], []).append((member, data))
    size = tar.stat().st_size
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as archive:
        for key in reversed(list(samples)):
            for member, data in samples[key]:
                archive.addfile(member, io.BytesIO(data))
    assert tar.stat().st_size == size


def _damage(shards: Path, kind: str) -> Path:
    """Make the first shard's index wrong in one way; returns that shard."""
    tars = sorted(shards.glob("*.tar"))
    tar, idx = tars[0], index_path(tars[0])
    if kind == "stale":  # the tar replaced by another of the same size, its old index kept
        _rewrite_reordered(tar)
    elif kind == "shorter":  # an index missing the tar's last sample
        lines = idx.read_text().splitlines()
        idx.write_text("\n".join([f"v1.2 {len(lines) - 2}", *lines[1:-1]]) + "\n")
    elif kind == "longer":  # the index of a longer tar: this tar is a shorter rewrite of it
        with tarfile.open(tar) as archive:
            members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
        longer = tar.with_name("longer.tmp")
        shutil.copy(tar, longer)
        with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as archive:
            for member, data in members[:-3]:
                archive.addfile(member, io.BytesIO(data))
        idx.write_text(index_text(longer))
        longer.unlink()
    elif kind == "foreign":  # another shard's index
        idx.write_text(index_path(tars[1]).read_text())
    return tar


INDEX_FAULTS = ["stale", "shorter", "longer", "foreign"]


@pytest.mark.parametrize("kind", INDEX_FAULTS)
def test_a_wrong_index_is_refused_before_dali_reads_it(shard_set, tmp_path, kind):
    shards = copy_set(shard_set, tmp_path)
    tar = _damage(shards, kind)
    with pytest.raises(ShardError) as caught:
        DaliLoader(shards, 16, TwoViews(), train=True)
    assert str(tar) in str(caught.value) and f"simclr-shards index {tar}" in str(caught.value)
    write_index(tar)  # the fix the message names works
    assert check_index_matches(read_index(tar)).num_samples > 0


@pytest.mark.parametrize("kind", INDEX_FAULTS)
def test_train_and_evaluate_exit_2_naming_the_shard_of_a_wrong_index(
    shard_set, tmp_path, capsys, kind
):
    shards = copy_set(shard_set, tmp_path)
    tar = _damage(shards, kind)
    assert run_train(tmp_path / "run", shards) == 2
    err = capsys.readouterr().err
    assert str(tar) in err and "simclr-shards index" in err and "Traceback" not in err
    status = evaluate.main(
        [
            *("--model", "resnet18", "--random_init", "true", "--protocol", "knn"),
            *(
                "--train_shards",
                str(shards),
                "--val_shards",
                str(shards),
                "--local_batch_size",
                "16",
            ),
        ]
    )
    err = capsys.readouterr().err
    assert (
        status == 2 and str(tar) in err and "simclr-shards index" in err and "Traceback" not in err
    )


def test_every_index_the_writer_makes_passes_the_check(shard_set):
    for tar in sorted(shard_set.glob("*.tar")):
        assert check_index_matches(read_index(tar), sampled=10**6).num_samples > 0


def test_long_member_names_pass_the_check(tmp_path):
    tar = tmp_path / "long.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as archive:
        for i in range(3):
            for ext, data in (("jpg", b"\xff\xd8" + bytes(300 + i)), ("cls", b"1")):
                info = tarfile.TarInfo(f"{'d' * 80}/{'k' * 60}{i}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    write_index(tar)
    assert check_index_matches(read_index(tar)).num_samples == 3


# --------------------------------------------------------------------------- 2. one integrity gate for every reader


@pytest.fixture(scope="module")
def two_steps(shard_set, tmp_path_factory) -> Path:
    """A finished 2-step run: checkpoints at steps 1 and 2 and its export (copy it before changing it)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert run_train(out, shard_set, max_steps=2, checkpoint_every=1) == 0
    return out


def copy_run(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out


def damage_file(path: Path, kind: str) -> None:
    if kind == "flipped byte":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        path.unlink()


def evaluate_args(shards: Path) -> list[str]:
    return [
        "--protocol",
        "knn",
        "--train_shards",
        str(shards),
        "--val_shards",
        str(shards),
        "--local_batch_size",
        "16",
    ]


@pytest.mark.parametrize("kind", ["flipped byte", "truncated", "missing"])
@pytest.mark.parametrize("reader", ["resume", "evaluate", "export"])
def test_a_damaged_checkpoint_is_refused_by_every_reader(
    two_steps, shard_set, tmp_path, capsys, reader, kind
):
    step = copy_run(two_steps, tmp_path) / "checkpoints" / "step_00000002"
    damage_file(step / "model.safetensors", kind)
    if reader == "resume":
        status = run_train(tmp_path / "fresh", shard_set, "--resume", step, max_steps=3)
    elif reader == "evaluate":
        status = evaluate.main(["--checkpoint", str(step), *evaluate_args(shard_set)])
    else:
        status = export.main([str(step), "--output_dir", str(tmp_path / "exported")])
    err = capsys.readouterr().err
    assert status == 2 and str(step / "model.safetensors") in err and "Traceback" not in err
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize(
    "name", ["backbone.safetensors", "backbone.json", "head.safetensors", "head.json"]
)
def test_a_damaged_export_is_refused_by_load_exported_and_evaluate(
    two_steps, shard_set, tmp_path, capsys, name
):
    backbone, head, meta = export.load_exported(two_steps)  # the intact export loads
    assert head is not None and meta["model_name"] == "resnet18"
    out = copy_run(two_steps, tmp_path)
    damage_file(out / name, "flipped byte")
    with pytest.raises(export.ExportError, match=re.escape(str(out / name))):
        export.load_exported(out)
    assert evaluate.main(["--checkpoint", str(out), *evaluate_args(shard_set)]) == 2
    assert str(out / name) in capsys.readouterr().err


def test_an_exported_checkpoint_carries_a_manifest_that_load_exported_checks(two_steps, tmp_path):
    target = tmp_path / "exported"
    assert (
        export.main([str(two_steps / "checkpoints" / "step_00000001"), "--output_dir", str(target)])
        == 0
    )
    listed = json.loads((target / "export-manifest.json").read_text())["files"]
    assert {
        "backbone.safetensors",
        "backbone.json",
        "head.safetensors",
        "head.json",
    } <= listed.keys()
    export.load_exported(target)
    damage_file(target / "head.safetensors", "truncated")
    with pytest.raises(export.ExportError, match="head.safetensors has"):
        export.load_exported(target)


# --------------------------------------------------------------------------- 3. one process per run directory


def files_of(directory: Path, ignore=("train.log", "run.lock")) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in ignore
    }


def start_training(out: Path, shards: Path, *flags, **overrides) -> subprocess.Popen:
    """train.py in a child process, returned once it printed its "run ... started" line (it holds the lock)."""
    config = out.parent / f"{out.name}-child.yaml"
    config.write_text(
        yaml.safe_dump({**TINY, "train_shards": str(shards), "output_dir": str(out), **overrides})
    )
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--config", str(config), *map(str, flags)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"},
    )
    for line in child.stdout:
        if " started with " in line or " resumed from " in line:
            return child
    raise AssertionError(f"train.py exited with {child.wait()} before starting")


@pytest.mark.slow
def test_a_second_process_on_a_run_is_refused_and_a_killed_holder_leaves_no_lock(
    two_steps, shard_set, tmp_path, capsys
):
    out = copy_run(two_steps, tmp_path)
    first = start_training(out, shard_set, "--resume", "auto", max_steps=100_000, epochs=100_000)
    try:
        before = files_of(out)
        for flags in (
            ("--resume", "auto"),
            ("--resume", out / "checkpoints" / "step_00000002"),
            ("--overwrite", "true"),
        ):
            assert run_train(out, shard_set, *flags, max_steps=3) == 2
            err = capsys.readouterr().err
            assert (
                f"process {first.pid} on host {socket.gethostname()}" in err and str(out) in err
            ), err
        assert files_of(out) == before  # nothing read-and-rewritten, nothing deleted
    finally:
        first.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        first.wait()
    assert run_train(out, shard_set, "--resume", "auto", max_steps=3) == 0
    assert "resumed from" in capsys.readouterr().out


# --------------------------------------------------------------------------- 8. rotation: complete or invisible


class KilledMidway(BaseException):
    """The process dies here (no handler of ours catches a BaseException that is not an Exception)."""


@pytest.mark.slow
def test_a_kill_during_rotation_leaves_no_incomplete_checkpoint(
    shard_set, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        if (
            Path(path).parent.name == "checkpoints"
        ):  # deleting a rotated checkpoint: half of it, then death
            for name in ("manifest.json", "model.safetensors"):
                (Path(path) / name).unlink()
            raise KilledMidway(path)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KilledMidway):
        run_train(out, shard_set, max_steps=3, checkpoint_every=1, keep_checkpoints=2)
    monkeypatch.undo()
    root = out / "checkpoints"
    finals = sorted(p for p in root.iterdir() if p.name.startswith("step_"))
    assert [p.name for p in finals] == [
        "step_00000002",
        "step_00000003",
    ]  # step 1 was being rotated away
    assert all((p / "manifest.json").is_file() for p in finals)  # complete under every final name
    (
        root / "step_00000042"
    ).mkdir()  # what an older version's interrupted rotation left: an empty step_N
    assert (
        run_train(
            out, shard_set, "--resume", "auto", max_steps=3, checkpoint_every=1, keep_checkpoints=2
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "removed 2 temporary checkpoint(s)" in printed and "step_00000042" in printed
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]


# --------------------------------------------------------------------------- 5. a full filesystem at every write


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 64 MiB tmpfs (needs root, as in the project's container; skipped elsewhere)."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)], capture_output=True
    )
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(filesystem: Path, leave: int = 0) -> Path:
    """Fill ``filesystem`` until ``leave`` bytes are free (for the log line that reports the failure)."""
    filler = filesystem / "filler"
    free = os.statvfs(filesystem).f_bavail * os.statvfs(filesystem).f_frsize
    with open(filler, "wb") as handle:
        try:
            handle.write(bytes(max(0, free - leave)))
            handle.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_a_full_disk_at_the_export_exits_1_and_resume_finishes_it(
    shard_set, tmp_path, small_filesystem, monkeypatch, capsys
):
    out = small_filesystem / "run"
    real_export = train.export_backbone

    def export_on_a_full_disk(*args, **kwargs):
        fill(small_filesystem, leave=64 * 1024)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(train, "export_backbone", export_on_a_full_disk)
    assert run_train(out, shard_set, max_steps=2) == 1
    err = capsys.readouterr().err
    assert (
        f"cannot write the export in {out}" in err
        and "No space left on device" in err
        and "Traceback" not in err
    )
    assert f"cannot write the export in {out}" in (out / "train.log").read_text()
    monkeypatch.undo()
    (small_filesystem / "filler").unlink()
    assert (
        run_train(out, shard_set, "--resume", "auto", max_steps=2) == 0
    )  # the checkpoint was intact
    export.load_exported(out)


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_exits_1_and_resume_finishes(
    shard_set, tmp_path, small_filesystem, monkeypatch, capsys
):
    out = small_filesystem / "run"
    real_save = checkpoint_module.Checkpointer.save

    def save_on_a_full_disk(self, model, optimizer, state, loader_state):
        if state["step"] == 2:
            fill(small_filesystem, leave=64 * 1024)
        return real_save(self, model, optimizer, state, loader_state)

    monkeypatch.setattr(checkpoint_module.Checkpointer, "save", save_on_a_full_disk)
    assert run_train(out, shard_set, max_steps=3, checkpoint_every=1) == 1
    err = capsys.readouterr().err
    assert (
        f"cannot write checkpoint {out / 'checkpoints' / 'step_00000002'}" in err
        and "No space left" in err
    )
    assert [p.name for p in (out / "checkpoints").iterdir()] == [
        "step_00000001"
    ]  # intact, no temporaries
    monkeypatch.undo()
    (small_filesystem / "filler").unlink()
    assert run_train(out, shard_set, "--resume", "auto", max_steps=3, checkpoint_every=1) == 0
    assert "resumed from" in capsys.readouterr().out


def test_a_full_disk_at_the_evaluation_report_exits_1_naming_it(
    shard_set, small_filesystem, capsys
):
    report = small_filesystem / "report.json"
    fill(small_filesystem)
    status = evaluate.main(
        [
            "--model",
            "resnet18",
            "--random_init",
            "true",
            "--json",
            str(report),
            *evaluate_args(shard_set),
        ]
    )
    err = capsys.readouterr().err
    assert (
        status == 1 and f"cannot write the --json report {report}" in err and "Traceback" not in err
    )
    assert not report.exists()


@pytest.mark.slow
def test_a_full_disk_under_the_tracker_exits_1_naming_its_directory_and_resume_finishes(
    shard_set, tmp_path, small_filesystem, monkeypatch, capsys
):
    """TensorBoard's directory alone on a filesystem that fills at step 2: a later step's event write fails
    (a full tmpfs still takes records into its last page, so not at once); exit 1 naming the directory."""
    from simclr_dali.trainer.meters import Meters

    out, board = tmp_path / "run", small_filesystem / "board"
    real_log_step = Meters.log_step

    def log_step_on_a_full_disk(self, step, *args):
        if step == 2:
            fill(small_filesystem)
        return real_log_step(self, step, *args)

    monkeypatch.setattr(Meters, "log_step", log_step_on_a_full_disk)
    thread_tracebacks = []  # what threading.excepthook would print: TensorBoard's writer thread fails first
    monkeypatch.setattr(threading, "excepthook", thread_tracebacks.append)
    flags = {"epochs": 20, "max_steps": 30, "checkpoint_every": 1, "tracker": "tensorboard"}
    flags["tracker_project"] = str(board)
    assert run_train(out, shard_set, **flags) == 1
    assert thread_tracebacks == []
    err = capsys.readouterr().err
    assert f"cannot write the tracker's files in {board} while logging step " in err, err[-3000:]
    assert "No space left on device" in err and "Traceback" not in err, err[-3000:]
    assert f"cannot write the tracker's files in {board}" in (out / "train.log").read_text()
    failed_at = int(re.search(r"while logging step (\d+)", err).group(1))
    assert (
        2 <= failed_at < 30
        and (out / "checkpoints" / f"step_{failed_at - 1:08d}" / "manifest.json").is_file()
    )
    monkeypatch.undo()
    (small_filesystem / "filler").unlink()
    assert run_train(out, shard_set, "--resume", "auto", **flags) == 0  # the checkpoint was intact
    assert (
        f"resumed from {out / 'checkpoints' / f'step_{failed_at - 1:08d}'} "
        in capsys.readouterr().out
    )


# --------------------------------------------------------------------------- 4. children die with their parent


def descendants(pid: int) -> set[int]:
    found = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            found |= {child} | descendants(child)
    return found


def alive(pid: int) -> bool:
    """Running, or not yet reaped by a PID 1 that reaps nothing (a zombie has ended: it holds no pipe)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


POOL_PARENT = """
import sys, time
from simclr_dali.common.processes import process_pool
pool = process_pool(2, sys.argv[1])
futures = [pool.submit(time.sleep, 120) for _ in range(4)]
print("ready", flush=True)
time.sleep(120)
"""


def kill_parent_and_find_survivors(parent: subprocess.Popen, workers: int) -> list[int]:
    """Wait for ``workers`` descendants of ``parent``, SIGKILL it, then the descendants still alive after 20 s
    (the parent's stdout must reach EOF too: nobody may hold it)."""
    deadline = time.monotonic() + 120
    try:
        while len(children := descendants(parent.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(children) >= workers, f"only {children} started"
        time.sleep(3)  # the rest of the pool (and the spawn context's resource tracker) starting
        children = descendants(parent.pid)
    finally:
        parent.kill()
    parent.communicate(timeout=60)  # EOF on its stdout: no orphan holds the pipe
    deadline = time.monotonic() + 20
    while any(map(alive, children)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [pid for pid in children if alive(pid)]


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_sigkill_of_a_pool_parent_leaves_no_worker(start_method):
    parent = subprocess.Popen(
        [sys.executable, "-c", POOL_PARENT, start_method],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert parent.stdout.readline().strip() == "ready"
    assert kill_parent_and_find_survivors(parent, 2) == []


BIG_PARENT = """
import mmap, sys
from simclr_dali.pipeline.shards.verify import verify_shards
from simclr_dali.pipeline.shards.shardset import shard_paths
total = int(open("/proc/meminfo").read().split()[1]) * 1024
try:  # reserved, never touched: what a long test session's heap held (VmData 20-40 GB); the kernel merges the
    # adjacent mappings into one larger than memory, which a fork cannot commit
    held = [mmap.mmap(-1, 1 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) for _ in range(int(1.2 * total) >> 30)]
except OSError:
    print("skip", flush=True)
    sys.exit(0)
count, problems = verify_shards(shard_paths(sys.argv[1]), progress=False, workers=2)
print("verified", count, len(problems), flush=True)
"""


def test_pools_start_from_a_process_whose_address_space_exceeds_memory(shard_set):
    """A fork must commit the parent's whole private mapping: from a process holding more reserved memory than the
    machine has, forked pools failed with ENOMEM (CI, after in-process training runs). Ours spawn."""
    done = subprocess.run(
        [sys.executable, "-c", BIG_PARENT, str(shard_set)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    if done.stdout.strip() == "skip":
        pytest.skip("this kernel's overcommit policy refuses the reservation itself")
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.fullmatch(r"verified \d+ 0", done.stdout.strip()), done.stdout


def test_a_finished_run_shuts_its_dali_pipelines_down(tmp_path, shard_set):
    """``DaliLoader.close`` at the end of ``train.main``: no pipeline of the run is left for the cycle collector."""
    from nvidia.dali.pipeline import Pipeline

    before = {id(ref()) for ref in Pipeline._pipes if ref() is not None}
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {**TINY, "train_shards": str(shard_set), "output_dir": str(tmp_path / "run")}
        )
    )
    assert train.main(["--config", str(config), "--max_steps", "2"]) == 0
    left = [ref() for ref in Pipeline._pipes if ref() is not None and id(ref()) not in before]
    assert left == []


LOADER_PARENT = """
import sys, time
from simclr_dali.pipeline.torchvision_baseline import TorchvisionPretrainLoader
batches = iter(TorchvisionPretrainLoader(sys.argv[1], 8, num_workers=2))
next(batches)
print("ready", flush=True)
time.sleep(120)
"""


def test_sigkill_of_a_torch_loader_parent_leaves_no_worker(shard_set):
    parent = subprocess.Popen(
        [sys.executable, "-c", LOADER_PARENT, str(shard_set)], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout.readline().strip() == "ready"
    assert kill_parent_and_find_survivors(parent, 2) == []


@pytest.mark.slow
def test_sigkill_of_simclr_shards_write_leaves_no_worker(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(
        240
    ):  # noise JPEGs: slow enough to re-encode that the write is still running when killed
        folder = tmp_path / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)).save(
            folder / f"{i}.jpg", quality=95
        )
    parent = subprocess.Popen(
        [
            *(
                sys.executable,
                "-m",
                "simclr_dali.pipeline.shards",
                "write",
                "folder",
                str(tmp_path / "images"),
            ),
            *(str(tmp_path / "out" / "s-%06d.tar"), "--max_side", "100", "--workers", "2"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert kill_parent_and_find_survivors(parent, 2) == []


# --------------------------------------------------------------------------- 7. the loader's pixel cap


def with_frame_size(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with the size in its frame header changed: to every header reader (PIL, DALI, our check) a
    ``width`` x ``height`` image, the few-KB shape of a decompression bomb."""
    position = 2
    while jpeg[position + 1] not in (0xC0, 0xC1, 0xC2):
        position += 2 + int.from_bytes(jpeg[position + 2 : position + 4], "big")
    frame = position + 5
    return jpeg[:frame] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[frame + 4 :]


def shard_with_a_bomb(source: Path, target: Path) -> tuple[Path, str]:
    """A copy of ``source``'s first shard whose 5th sample's image claims 20000 x 20000 pixels; (tar, its key)."""
    tar = sorted(source.glob("*.tar"))[0]
    target.mkdir()
    out = target / tar.name
    with (
        tarfile.open(tar) as archive,
        tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as rewritten,
    ):
        images = [m for m in archive.getmembers() if m.name.endswith(".jpg")]
        bomb = images[4].name
        for member in archive.getmembers():
            data = archive.extractfile(member).read()
            if member.name == bomb:
                data = with_frame_size(data, 20000, 20000)
                member.size = len(data)
            rewritten.addfile(member, io.BytesIO(data))
    write_index(out)
    return out, bomb.split(".")[0]


def test_a_decompression_bomb_is_refused_by_train_naming_shard_and_key(shard_set, tmp_path, capsys):
    tar, key = shard_with_a_bomb(shard_set, tmp_path / "bombed")
    assert run_train(tmp_path / "run", tar.parent) == 2
    err = capsys.readouterr().err
    assert (
        f"shard {tar} key {key}: a 20000 x 20000 image" in err and "pixel cap of 178,956,970" in err
    )
    problems = verify_shard(tar)[1]  # the writer's check refuses it too: the same cap
    assert any(key in problem and "DecompressionBomb" in problem for problem in problems), problems


def test_the_pixel_cap_is_configurable_and_named(shard_set, tmp_path, capsys):
    assert (
        run_train(tmp_path / "run", shard_set, loader={"max_image_pixels": 1000}) == 2
    )  # the set's images are 32 x 32
    assert "over the pixel cap of 1,000 (max_image_pixels" in capsys.readouterr().err
    assert (
        MAX_IMAGE_PIXELS == 2 * PIL.Image.MAX_IMAGE_PIXELS
    )  # PIL's bomb error, which write and verify get


# --------------------------------------------------------------------------- 1 and 7 in a bucket (SeaweedFS)

BUCKET_FAULTS = [*INDEX_FAULTS, "bomb"]


def bucket_with_a_fault(s3_env, shard_set: Path, tmp_path: Path, kind: str) -> tuple[str, str, str]:
    """A copy of ``shard_set`` with one fault (a wrong ``.idx`` or a 20000 x 20000 JPEG) uploaded to its own
    prefix of a real SeaweedFS bucket: (the set's URL, the faulty shard's URL, what the error must say)."""
    from simclr_dali.bench.s3_local import upload_directory

    url = f"s3://simclr-faults/{kind}-{tmp_path.name}/"
    if kind == "bomb":
        tar, key = shard_with_a_bomb(shard_set, tmp_path / "shards")
        expected = f"key {key}: a 20000 x 20000 image ({20000**2:,} pixels) is over the pixel cap"
    else:
        tar = _damage(copy_set(shard_set, tmp_path), kind)
        expected = "does not match the tar"
    upload_directory(tar.parent, url, s3_env.env())
    return url, url + tar.name, expected


@pytest.mark.parametrize("kind", BUCKET_FAULTS)
def test_a_wrong_index_or_a_bomb_in_a_bucket_is_refused_before_dali_reads_it(
    s3_env, shard_set, tmp_path, kind
):
    url, shard, expected = bucket_with_a_fault(s3_env, shard_set, tmp_path, kind)
    with pytest.raises(ShardError) as caught:
        for _ in DaliLoader(
            url, 8, TwoViews(), train=True, shuffle_buffer=8
        ):  # one epoch: reads every shard
            pass
    assert f"shard {shard}" in str(caught.value) and expected in str(caught.value), caught.value
    if kind != "bomb":  # the fix it names, for the bucket: simclr-shards index s3://.../part.tar
        assert f"rebuild it with: simclr-shards index {shard}" in str(caught.value)


@pytest.mark.parametrize("kind", BUCKET_FAULTS)
def test_train_from_a_bucket_exits_2_naming_the_shard_of_a_wrong_index_or_a_bomb(
    s3_env, shard_set, tmp_path, capsys, kind
):
    url, shard, expected = bucket_with_a_fault(s3_env, shard_set, tmp_path, kind)
    assert run_train(tmp_path / "run", url, max_steps=6) == 2
    err = capsys.readouterr().err
    assert f"shard {shard}" in err and expected in err and "Traceback" not in err, err[-3000:]


def test_a_subset_of_a_bucket_is_checked_against_its_whole_shards(s3_env, shard_set, tmp_path):
    """A subset by key filters the indexes in memory; the check of a fetched shard uses its whole index (a
    filtered one ends before the tar's last member and would be refused as a longer tar's)."""
    from simclr_dali.bench.s3_local import upload_directory
    from simclr_dali.pipeline.loader import EvalView
    from simclr_dali.pipeline.shards.shardset import sample_key

    url = f"s3://simclr-faults/subset-{tmp_path.name}/"
    upload_directory(shard_set, url, s3_env.env())
    first = read_index(sorted(shard_set.glob("*.tar"))[0])
    keys = [sample_key(next(iter(sample.values()))[2]) for sample in first.samples[:10]]
    loader = DaliLoader(url, 5, EvalView(16, 16), train=False, keys=keys)
    assert sum(len(labels) for _, labels in loader) == 10


# --------------------------------------------------------------------------- hostile member names


@pytest.mark.parametrize(
    "key,ext",
    [
        ("../evil", "jpg"),
        ("/etc/evil", "jpg"),
        ("a/../../evil", "jpg"),
        ("ok", "jpg/../../evil"),
        ("ok", "/x"),
    ],
)
def test_write_refuses_member_names_outside_the_folder(tmp_path, key, ext):
    with pytest.raises(ShardError, match="refused|not a valid key"):
        with ShardWriter(str(tmp_path / "s-%06d.tar")) as writer:
            writer.add(key, {ext: b"\xff\xd8", "cls": b"1"})
    assert not list(tmp_path.glob("*.tar"))


@pytest.mark.parametrize(
    "name,why", [("../evil.jpg", "a '..' part"), ("/abs/evil.jpg", "an absolute path")]
)
def test_verify_names_member_names_outside_the_folder(shard_set, tmp_path, name, why):
    source = sorted(shard_set.glob("*.tar"))[0]
    tar = tmp_path / "hostile.tar"
    with (
        tarfile.open(source) as archive,
        tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as rewritten,
    ):
        members = archive.getmembers()
        for member in members:
            rewritten.addfile(member, io.BytesIO(archive.extractfile(member).read()))
        image = archive.extractfile(members[0]).read()
        info = tarfile.TarInfo(name)
        info.size = len(image)
        rewritten.addfile(info, io.BytesIO(image))
    write_index(tar)
    problems = verify_shard(tar, require_labels=False)[1]
    assert any(repr(name) in problem and why in problem for problem in problems), problems

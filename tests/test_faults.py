"""Fault injection: runs that never lose or silently corrupt work (issue 15). Each test injects one fault into a
tiny real run (DALI on CPU, timm ResNet, Accelerate; 2 gloo processes under torchrun where ranks matter) and
checks what survives: which checkpoint exists, what the next start does with it, that the final weights equal
an uninterrupted run's bit for bit, and that bad input is named in one line with exit status 2."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, make_shards, tiny
from safetensors.torch import load_file

import simclr_dali.trainer.checkpoint as checkpoint_module
from simclr_dali import evaluate, train
from simclr_dali.model.settings import MODEL_FIELDS
from simclr_dali.pipeline.loader import DaliLoader, TwoViews
from simclr_dali.pipeline.shards.shardset import read_index
from simclr_dali.trainer.checkpoint import FILES, list_checkpoints
from simclr_dali.trainer.optim import build_scheduler

TINY = tiny(max_steps=6)
WORKER = ROOT / "tests" / "fault_worker.py"
STEPS_PER_EPOCH = 4  # 70 samples, batches of 16 (one process) or 2 x 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory, _ = make_shards(tmp_path_factory.mktemp("faults"), 70, num_classes=12, per_shard=30)
    return directory


def write_config(path: Path, shards, **overrides) -> Path:
    path.write_text(yaml.safe_dump({**TINY, "train_shards": str(shards), **overrides}))
    return path


def run_train(out: Path, shards, *flags, **overrides) -> int:
    """train.main in this process: TINY + ``overrides`` (a YAML config), output in ``out``, then ``flags``."""
    config = write_config(
        out.parent / f"{out.name}.yaml", shards, **{"output_dir": str(out), **overrides}
    )
    return train.main(["--config", str(config), *map(str, flags)])


def torchrun(spec: dict, config: Path, *flags, timeout=420) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        json.dumps(spec),
        "--config",
        str(config),
        *map(str, flags),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def reports(directory: Path) -> list[dict]:
    return [json.loads((directory / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def names(out: Path) -> list[str]:
    return [p.name for p in list_checkpoints(out)]


def run_id(out: Path) -> str:
    return json.loads((out / "run.json").read_text())["run_id"]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "backbone.safetensors"))


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def rewrite_json(checkpoint: Path, name: str, change) -> None:
    """Change a JSON file of a checkpoint and its manifest entry consistently (a crafted, verifying checkpoint)."""
    data = json.loads((checkpoint / name).read_text())
    change(data)
    raw = json.dumps(data).encode()
    (checkpoint / name).write_bytes(raw)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def one_error_line(captured) -> str:
    """The only line on stderr (progress-bar redraws aside), which must not be a traceback."""
    lines = [
        line
        for line in re.split(r"[\r\n]", captured.err)
        if line.strip() and not line.startswith("train:")
    ]
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    return lines[0]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> dict:
    """The weights of an uninterrupted 6-step run: what every interrupted and resumed run must end with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_train(out, shards) == 0
    return weights(out)


@pytest.fixture(scope="module")
def two_steps(shards, tmp_path_factory) -> Path:
    """A run stopped after 2 steps with checkpoints at steps 1 and 2 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert run_train(out, shards, max_steps=2, checkpoint_every=1) == 0
    return out


def copy_run(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if train.py builds a data loader: for refusals that must come before any heavy work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the data loader was built before the refusal")

    monkeypatch.setattr(train, "build_train_loader", refuse)


# --------------------------------------------------------------------------- run identity


@pytest.mark.slow
def test_two_runs_in_one_directory_never_touch_each_other(shards, tmp_path, capsys):
    out = tmp_path / "shared"
    assert run_train(out, shards, max_steps=3, checkpoint_every=1, keep_checkpoints=5) == 0
    first = run_id(out)
    assert names(out) == ["step_00000001", "step_00000002", "step_00000003"]
    capsys.readouterr()
    # a fresh start into that directory is refused, naming the ways out; nothing of the first run changes
    assert run_train(out, shards, max_steps=2, checkpoint_every=1, keep_checkpoints=1) == 2
    message = one_error_line(capsys.readouterr())
    assert (
        "--resume auto" in message
        and "--overwrite" in message
        and first in message
        and str(out) in message
    )
    assert (
        names(out) == ["step_00000001", "step_00000002", "step_00000003"] and run_id(out) == first
    )
    # another run's checkpoint with a newer step in the same directory: never resumed, never rotated away
    other = tmp_path / "other"
    assert run_train(other, shards, max_steps=5) == 0
    shutil.copytree(other / "checkpoints" / "step_00000005", out / "checkpoints" / "step_00000005")
    assert (
        run_train(
            out, shards, "--resume", "auto", max_steps=4, checkpoint_every=1, keep_checkpoints=1
        )
        == 0
    )
    assert f"resumed from {out / 'checkpoints' / 'step_00000003'}" in capsys.readouterr().out
    assert names(out) == [
        "step_00000004",
        "step_00000005",
    ]  # the first run's older ones rotated, the other run's kept
    owners = [
        json.loads((out / "checkpoints" / n / "manifest.json").read_text())["run_id"]
        for n in names(out)
    ]
    assert owners == [first, run_id(other)]
    # --overwrite: a new run, the previous run's checkpoints gone
    assert run_train(out, shards, "--overwrite", "true", max_steps=1) == 0
    assert run_id(out) != first and names(out) == ["step_00000001"]
    assert json.loads((out / "checkpoints" / "step_00000001" / "manifest.json").read_text())[
        "run_id"
    ] == run_id(out)
    assert (
        yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 1
    )  # the resolved config of this start


@pytest.mark.slow
def test_ranks_that_list_different_newest_checkpoints_load_rank_0s_choice(shards, tmp_path):
    """Rank 1 sees a stale directory listing without the newest checkpoint; both ranks still load
    the one rank 0 chose."""
    out = tmp_path / "ranks"
    config = write_config(
        tmp_path / "ranks.yaml", shards, output_dir=str(out), max_steps=2, checkpoint_every=1
    )
    done = torchrun({}, config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = torchrun(
        {"report": str(tmp_path / "report"), "hide_newest_checkpoint_on": [1]},
        config,
        "--resume",
        "auto",
        "--max_steps",
        3,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rank0, rank1 = reports(tmp_path / "report")
    assert rank0["loaded"] == rank1["loaded"] == [str(out / "checkpoints" / "step_00000002")]


# --------------------------------------------------------------------------- writing


def test_every_file_and_the_directory_are_fsynced_before_the_rename(shards, tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def spy_fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def spy_rename(source, target):
        events.append(("rename", os.path.realpath(source), os.path.realpath(target)))
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "rename", spy_rename)
    out = tmp_path / "synced"
    assert run_train(out, shards, max_steps=2, checkpoint_every=1) == 0
    for name in ("step_00000001", "step_00000002"):
        final = os.path.realpath(out / "checkpoints" / name)
        renamed = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == final]
        assert len(renamed) == 1, f"{name} was not renamed into place exactly once"
        at, staging = renamed[0], events[renamed[0]][1]
        synced_before = {e[1] for e in events[:at] if e[0] == "fsync"}
        assert {os.path.join(staging, f) for f in [*FILES, "manifest.json"]} <= synced_before, (
            "a file was renamed unsynced"
        )
        assert staging in synced_before, "the directory was renamed before its entries were synced"
        assert os.path.dirname(final) in {e[1] for e in events[at:] if e[0] == "fsync"}, (
            "the rename itself was not synced"
        )
        assert sorted(os.listdir(final)) == sorted([*FILES, "manifest.json"])


@pytest.mark.slow
def test_a_crash_between_write_and_rename_leaves_no_visible_partial(
    shards, tmp_path, reference, capsys
):
    out = tmp_path / "crash"
    config = write_config(tmp_path / "crash.yaml", shards, output_dir=str(out), checkpoint_every=1)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            json.dumps({"crash_before_rename": 2}),
            "--config",
            str(config),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 9, done.stderr[-3000:]
    visible = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    hidden = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert visible == ["step_00000001"]  # the crashed write never shows under a checkpoint's name
    assert len(hidden) == 1 and hidden[0].startswith(
        f".tmp-{run_id(out)}-step_00000002-"
    )  # named by run, step and process
    assert run_train(out, shards, "--resume", "auto", checkpoint_every=1) == 0
    printed = capsys.readouterr().out
    assert (
        "removed 1 temporary checkpoint(s)" in printed
        and f"resumed from {out / 'checkpoints' / 'step_00000001'}" in printed
    )
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert_identical(weights(out), reference)


def test_stale_temporaries_are_cleaned_and_an_interrupted_replacement_restored(
    two_steps, tmp_path, capsys
):
    out = copy_run(two_steps, tmp_path)
    root = out / "checkpoints"
    (root / f".tmp-{run_id(out)}-step_00000003-4242").mkdir()
    (root / f".tmp-{run_id(out)}-step_00000003-4242" / "model.safetensors").write_bytes(b"half")
    (root / ".tmp-0123abcd-step_00000009-7").mkdir()
    # a crash inside the replacement of step 2: the old copy set aside, the new one never renamed in
    (root / ".replaced-step_00000002-x").mkdir()
    (root / "step_00000002").rename(root / ".replaced-step_00000002-x" / "step_00000002")
    assert run_train(out, shards_of(out), "--resume", "auto", max_steps=3) == 0
    printed = capsys.readouterr().out
    assert (
        "removed 2 temporary checkpoint(s)" in printed
        and f"resumed from {root / 'step_00000002'}" in printed
    )
    assert sorted(p.name for p in root.iterdir()) == [
        "step_00000001",
        "step_00000002",
        "step_00000003",
    ]


def shards_of(out: Path) -> str:
    return yaml.safe_load((out / "config.yaml").read_text())["train_shards"]


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(shards, tmp_path, monkeypatch, capsys):
    real_write, calls = checkpoint_module.write_durable, []

    def full_disk(path, data):
        calls.append(path)
        if "step_00000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(checkpoint_module, "write_durable", full_disk)
    out = tmp_path / "full"
    assert run_train(out, shards, max_steps=3, checkpoint_every=1) == 1
    message = one_error_line(capsys.readouterr())
    assert (
        "step_00000002" in message
        and "No space left on device" in message
        and "previous checkpoints are intact" in message
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000001"
    ]  # no temporary left either


def test_an_unwritable_output_directory_is_named_before_training(
    shards, tmp_path, capsys, no_heavy_work
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert run_train(tmp_path / "x", shards, output_dir=str(blocker / "run")) == 2
    message = one_error_line(capsys.readouterr())
    assert f"output_dir {blocker / 'run'} is not writable" in message
    assert run_train(tmp_path / "y", shards, eval_json=str(blocker / "curve.json")) == 2
    assert "eval_json's directory" in one_error_line(capsys.readouterr())


# --------------------------------------------------------------------------- what resume trusts


class Payload:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_is_never_executed(two_steps, tmp_path, capsys, data_for_evaluate):
    out = copy_run(two_steps, tmp_path)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Payload(marker))
    newest = out / "checkpoints" / "step_00000002"
    for name in (
        "custom_checkpoint_0.pkl",
        "random_states_0.pkl",
        "optimizer.bin",
        "scheduler.bin",
        "pytorch_model.bin",
        "model.pt",
    ):
        (newest / name).write_bytes(
            payload
        )  # every name Accelerate's save_state/load_state would unpickle
    assert run_train(out, shards_of(out), "--resume", "auto", max_steps=3) == 0
    assert f"resumed from {newest}" in capsys.readouterr().out and not marker.exists()
    # a checkpoint in the old Accelerate layout (pickles, no manifest) is refused by path, not loaded
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        (legacy / name).write_bytes(payload)
    shutil.copy(newest / "trainer_state.json", legacy / "trainer_state.json")
    assert run_train(tmp_path / "fresh", shards_of(out), "--resume", legacy) == 2
    assert "has no manifest.json" in one_error_line(capsys.readouterr()) and not marker.exists()
    # a model file that is a pickle: the manifest's checksum rejects it before any parser sees it
    (newest / "model.safetensors").write_bytes(payload)
    assert run_train(tmp_path / "fresh2", shards_of(out), "--resume", newest) == 2
    assert "model.safetensors" in one_error_line(capsys.readouterr()) and not marker.exists()
    # evaluate.py: a pickled weights file is refused by torch.load(weights_only=True)
    evil = tmp_path / "weights.pt"
    evil.write_bytes(payload)
    status = evaluate.main(
        ["--model", "resnet18", "--weights", str(evil), "--protocol", "knn", *data_for_evaluate]
    )
    assert status == 2 and str(evil) in capsys.readouterr().err and not marker.exists()


def test_non_finite_parameters_after_a_finite_loss_step_are_not_checkpointed(
    shards, tmp_path, monkeypatch, capsys
):
    real_step, losses = train.train_step, []

    def poisoned_step(model, *args, **kwargs):
        out = real_step(model, *args, **kwargs)
        losses.append(out.loss.item())
        if len(losses) == 3:  # the update of step 3 leaves a non-finite weight; its loss was finite
            with torch.no_grad():
                weight = next(model.parameters())
                weight[(0,) * weight.dim()] = float("nan")
        return out

    monkeypatch.setattr(train, "train_step", poisoned_step)
    out = tmp_path / "nan"
    assert run_train(out, shards, checkpoint_every=1, keep_checkpoints=1, log_every=100) == 3
    assert all(torch.isfinite(torch.tensor(losses)))
    assert "non-finite loss or parameters at step 3" in capsys.readouterr().err
    assert names(out) == [
        "step_00000002"
    ]  # keep_checkpoints=1 and the only good checkpoint survives
    saved = load_file(str(out / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())


@pytest.mark.parametrize(
    "flags,accepted,named",
    [
        (["--epochs", 6], True, "epochs: 3.0 -> 6.0"),
        (
            ["--log_every", 2, "--checkpoint_every", 2, "--keep_checkpoints", 1],
            True,
            "log_every: 1 -> 2",
        ),
        (
            [
                "--eval_every_epochs",
                1,
                "--eval_train_shards",
                "SHARDS",
                "--eval_val_shards",
                "SHARDS",
            ],
            True,
            "eval_every_epochs: None -> 1.0",
        ),
        (["--batch_size", 8], False, "batch_size: 16 -> 8"),
        (["--backbone", "resnet34"], False, "backbone: 'resnet18' -> 'resnet34'"),
        (["--optimizer", "sgd"], False, "optimizer: 'lars' -> 'sgd'"),
        (["--lr", 0.1], False, "lr: 0.5 -> 0.1"),
        (["--warmup_epochs", 0], False, "warmup_epochs: 1.0 -> 0.0"),
        (["--temperature", 0.5], False, "temperature: 0.2 -> 0.5"),
        (["--seed", 1], False, "seed: 0 -> 1"),
        (["--image_size", 48], False, "augment.size: 32 -> 48"),
        (
            ["--augment.crop_sampler", "uniform_area"],
            False,
            "augment.crop_sampler: 'tf' -> 'uniform_area'",
        ),
        (["--epochs", 2], True, "epochs: 3.0 -> 2.0"),
    ],
)
def test_resume_with_a_changed_field(
    two_steps, tmp_path, capsys, monkeypatch, flags, accepted, named
):
    out = copy_run(two_steps, tmp_path)
    flags = [shards_of(out) if f == "SHARDS" else f for f in flags]
    if not accepted:
        monkeypatch.setattr(
            train,
            "build_train_loader",
            lambda *a, **k: pytest.fail("refused only after building the data loader"),
        )
    status = train.main(
        [
            "--config",
            str(two_steps.parent / "run.yaml"),
            "--output_dir",
            str(out),
            "--resume",
            "auto",
            "--max_steps",
            "3",
            *map(str, flags),
        ]
    )
    captured = capsys.readouterr()
    if accepted:
        applied = [
            line
            for line in captured.out.splitlines()
            if line.startswith("resume applies the changed ")
        ]
        assert status == 0 and len(applied) == 1 and named in applied[0], (
            captured.out + captured.err
        )
        assert names(out)[-1] == "step_00000003"
    else:
        message = one_error_line(captured)
        assert (
            status == 2
            and named in message
            and "cannot resume" in message
            and "--overwrite" in message
        )
        assert names(out) == ["step_00000001", "step_00000002"]


# The fields as checkpoints and config files held them before the config tree (flat, at the top level): old name
# -> its place in today's sections ("augment" held the view preset's name).
FLAT_FORMAT = {
    "image_size": ("augment", "size"),
    "augment": ("augment", "preset"),
    "jitter_strength": ("augment", "jitter_strength"),
    "blur_prob": ("augment", "blur_prob"),
    "contrast_per_channel": ("augment", "contrast_per_channel"),
    "brightness_impl": ("augment", "brightness_impl"),
    "crop_sampler": ("augment", "crop_sampler"),
    "roi_decode": ("augment", "roi_decode"),
    "blur_padding": ("augment", "blur_padding"),
    "shuffle_buffer": ("loader", "shuffle_buffer"),
    "data_threads": ("loader", "threads"),
    "prefetch": ("loader", "prefetch"),
    "data_device": ("loader", "device"),
    "data_loader": ("loader", "kind"),
}


def as_flat_format(config: dict) -> dict:
    """Today's nested config written the way checkpoints were before the config tree: flat fields, the view
    preset's jitter and blur as null, ``min_crop_area`` for the crop's range, the view's other fields absent."""
    sections = {name: config.pop(name) for name in ("augment", "loader")}
    flat = {old: sections[section][name] for old, (section, name) in FLAT_FORMAT.items()}
    flat.update(
        jitter_strength=None, blur_prob=None, min_crop_area=sections["augment"]["crop_area"][0]
    )
    config.update(flat)
    config.update(config.pop("model"))  # the model's settings were top-level fields too
    return config


def test_the_model_section_and_the_readers_of_saved_configs_agree():
    """``model.settings.MODEL_FIELDS`` (what evaluation and export read from a saved config, without importing
    the trainer) is ``ModelConfig``'s fields, and both spellings of a saved config give the same settings."""
    from simclr_dali.model.settings import model_settings
    from simclr_dali.trainer.config import ModelConfig, config_from_dict

    assert tuple(f.name for f in dataclasses.fields(ModelConfig)) == MODEL_FIELDS
    flat = {"backbone": "resnet18", "proj_dim": 16, "cifar_stem": True, "train_shards": "x"}
    nested = config_from_dict(flat).to_dict()
    assert "backbone" not in nested and nested["model"]["backbone"] == "resnet18"
    for config in (flat, nested):
        settings = model_settings(config)
        assert (settings["backbone"], settings["proj_dim"], settings["cifar_stem"]) == (
            "resnet18",
            16,
            True,
        )


def test_a_checkpoint_of_the_flat_config_format_resumes_exactly(
    two_steps, shards, tmp_path, reference, capsys
):
    """Checkpoints and config.yaml written before the config tree (flat view fields) resume under today's nested
    config: nothing counts as changed, the run continues bit-identical to an uninterrupted one."""
    out = copy_run(two_steps, tmp_path)
    for checkpoint in list_checkpoints(out):
        rewrite_json(
            checkpoint, "trainer_state.json", lambda state: as_flat_format(state["config"])
        )
        saved = json.loads((checkpoint / "trainer_state.json").read_text())["config"]
        assert (
            saved["image_size"] == 32 and saved["augment"] == "cifar" and saved["data_threads"] == 1
        )
        assert "crop_area" not in saved and "loader" not in saved
        assert saved["backbone"] == "resnet18" and saved["proj_dim"] == 16 and "model" not in saved
    run_config = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump(as_flat_format(run_config)))
    flat_keys = ("image_size", "augment", "data_threads", *MODEL_FIELDS)
    nested = {k: v for k, v in TINY.items() if k not in flat_keys}
    config = tmp_path / "nested.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                **nested,
                "augment": {"preset": "cifar", "size": 32},
                "loader": {"threads": 1},
                "model": {k: TINY[k] for k in MODEL_FIELDS if k in TINY},
                "train_shards": str(shards),
            }
        )
    )
    capsys.readouterr()
    assert train.main(["--config", str(config), "--output_dir", str(out), "--resume", "auto"]) == 0
    output = capsys.readouterr().out
    assert "resumed from" in output and "step_00000002" in output, output
    changed = " ".join(line for line in output.splitlines() if line.startswith("resume applies"))
    assert not re.search(r"\b(augment|loader|model)\.", changed), output
    assert_identical(weights(out), reference)
    assert (
        yaml.safe_load((out / "config.yaml").read_text())["augment"]["size"] == 32
    )  # today's format again


def test_extended_epochs_rebuild_the_schedule_from_the_config(two_steps, tmp_path):
    """The lr after resuming with twice the epochs is the new schedule's at that step: rebuilt from (config, step),
    not restored from the checkpoint (which would keep the old schedule's shorter cosine)."""
    out = copy_run(two_steps, tmp_path)
    assert (
        train.main(
            [
                "--config",
                str(two_steps.parent / "run.yaml"),
                "--output_dir",
                str(out),
                "--resume",
                "auto",
                "--max_steps",
                "6",
                "--epochs",
                "6",
            ]
        )
        == 0
    )
    logged = [line for line in (out / "train.log").read_text().splitlines() if " step 6: " in line][
        -1
    ]
    lr = float(logged.split("lr ")[1].split(",")[0])

    def scheduled(epochs: int) -> float:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5 * 16 / 256)
        build_scheduler(
            optimizer, total_steps=epochs * STEPS_PER_EPOCH, warmup_steps=STEPS_PER_EPOCH
        ).step_update(6)
        return optimizer.param_groups[0]["lr"]

    assert lr == pytest.approx(scheduled(6), rel=1e-3) and scheduled(6) != pytest.approx(
        scheduled(3), rel=1e-2
    )


@pytest.mark.parametrize("allow", [False, True])
def test_resume_with_another_world_size(two_steps, tmp_path, capsys, allow):
    """A checkpoint written by 2 processes, resumed by 1: refused unless --allow_world_size_change."""
    out = copy_run(two_steps, tmp_path)
    newest = out / "checkpoints" / "step_00000002"

    def as_two_ranks(state):
        state["world_size"] = 2
        state["loaders"] = [{**state["loaders"][0], "shard_id": r, "num_shards": 2} for r in (0, 1)]

    rewrite_json(newest, "trainer_state.json", as_two_ranks)
    rewrite_json(newest, "rng.json", lambda rng: rng["ranks"].append(rng["ranks"][0]))
    status = train.main(
        [
            "--config",
            str(two_steps.parent / "run.yaml"),
            "--output_dir",
            str(out),
            "--resume",
            "auto",
            "--max_steps",
            "3",
            *(["--allow_world_size_change", "true"] if allow else []),
        ]
    )
    captured = capsys.readouterr()
    if allow:
        assert (
            status == 0
            and "world size 2 -> 1" in captured.out
            and "restarts at the beginning of the current epoch" in captured.out
        )
    else:
        assert (
            status == 2
            and "world size: 2 -> 1" in one_error_line(captured)
            and "--allow_world_size_change" in captured.err
        )


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(
    shards, tmp_path, reference, capsys
):
    out = tmp_path / "truncated"
    assert run_train(out, shards, max_steps=3, checkpoint_every=1) == 0
    damaged = out / "checkpoints" / "step_00000003" / "model.safetensors"
    damaged.write_bytes(
        damaged.read_bytes()[: damaged.stat().st_size // 2]
    )  # what a node crash can leave
    capsys.readouterr()
    assert run_train(out, shards, "--resume", "auto", checkpoint_every=1) == 0
    printed = capsys.readouterr().out
    assert (
        "step_00000003 fails verification" in printed
        and "falling back to the previous one" in printed
    )
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'}" in printed
    assert (
        out / "checkpoints" / "step_00000003.unusable"
    ).is_dir()  # kept for inspection, never picked again
    assert_identical(weights(out), reference)


@pytest.mark.parametrize(
    "name,damage",
    [
        ("model.safetensors", "truncate"),
        ("optimizer.safetensors", "flip"),
        ("optimizer.json", "delete"),
        ("rng.json", "truncate"),
        ("rng.json", "delete"),
        ("trainer_state.json", "flip"),
        ("manifest.json", "truncate"),
        ("rng.json", "malformed"),
    ],
)
def test_every_state_file_is_verified_and_a_bad_one_named(
    two_steps, tmp_path, capsys, monkeypatch, name, damage
):
    out = copy_run(two_steps, tmp_path)
    newest = out / "checkpoints" / "step_00000002"
    path = newest / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    elif damage == "delete":
        path.unlink()
    else:  # verifies against its manifest, but the RNG state inside cannot be restored (Accelerate would log and go on)
        rewrite_json(
            newest,
            name,
            lambda rng: rng["ranks"][0].update(torch_cpu=rng["ranks"][0]["torch_cpu"][:40]),
        )
    if damage != "malformed":
        monkeypatch.setattr(
            train,
            "build_train_loader",
            lambda *a, **k: pytest.fail("a damaged checkpoint got past the start-up checks"),
        )
    assert run_train(tmp_path / "other", shards_of(out), "--resume", newest) == 2
    message = one_error_line(capsys.readouterr())
    assert str(path) in message
    if damage == "malformed":
        assert "torch_cpu RNG state cannot be restored" in message


# --------------------------------------------------------------------------- preemption


def boundary_steps(
    last: int, log_every: int, checkpoint_every: int, eval_every: int
) -> dict[str, list[int]]:
    steps = range(2, last)
    kinds = {
        "log": [s for s in steps if s % log_every == 0 and s % checkpoint_every and s % eval_every],
        "checkpoint": [s for s in steps if s % checkpoint_every == 0 and s % eval_every],
        "eval": [s for s in steps if s % eval_every == 0],
    }
    kinds["between"] = [s for s in steps if all(s not in v for v in kinds.values())]
    return kinds


@pytest.mark.slow
def test_sigterm_under_torchrun_at_seeded_steps_resumes_bit_identical(shards, tmp_path):
    """2 gloo ranks, 12 steps, log every 2, checkpoint every 3, evaluate every 5 steps. A SIGTERM reaches one rank (or
    the launcher, which forwards it to both) at seeded steps between and on each kind of boundary; every time both
    ranks stop after the same step, with a checkpoint of it and status 75; resumed to the end, the weights and the
    evaluation curve equal an uninterrupted run's."""
    settings = dict(
        max_steps=12,
        log_every=2,
        checkpoint_every=3,
        eval_every_epochs=1.25,
        eval_train_shards=str(shards),
        eval_val_shards=str(shards),
        eval_knn_k=5,
        shuffle_buffer=64,
    )
    reference = tmp_path / "reference"
    done = torchrun(
        {}, write_config(tmp_path / "reference.yaml", shards, output_dir=str(reference), **settings)
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    kinds, rng = boundary_steps(12, 2, 3, 5), random.Random(15)
    while True:  # one seeded step of each kind, far enough apart that each segment takes a step before its signal
        plan = sorted(
            (rng.choice(kinds[kind]), kind) for kind in ("between", "log", "checkpoint", "eval")
        )
        if all(later - earlier >= 2 for (earlier, _), (later, _) in zip(plan, plan[1:])):
            break
    out = tmp_path / "preempted"
    config = write_config(tmp_path / "preempted.yaml", shards, output_dir=str(out), **settings)
    for segment, (signal_step, kind) in enumerate(plan):
        start = (
            json.loads((list_checkpoints(out)[-1] / "trainer_state.json").read_text())["step"]
            if segment
            else 0
        )
        via_launcher = (
            segment == len(plan) - 1
        )  # the scheduler's way: torchrun's agent forwards it to every worker
        fault = {
            "sigterm_launcher_after_step" if via_launcher else "sigterm_after_step": {
                str(segment % 2): signal_step - start
            }
        }
        report = tmp_path / f"report{segment}"
        done = torchrun(
            {"report": str(report), **fault}, config, *(["--resume", "auto"] if segment else [])
        )
        output = done.stdout[-3000:] + done.stderr[-3000:]
        rank0, rank1 = reports(report)
        assert rank0["status"] == rank1["status"] == 75, output
        assert rank0["steps"] == rank1["steps"], output  # both ranks stopped after the same step
        stopped = start + rank0["steps"]
        # on an eval boundary the evaluation is skipped; elsewhere the step whose batch was fetched completes
        if not via_launcher:
            assert stopped == (signal_step if kind == "eval" else signal_step + 1), (
                kind,
                signal_step,
                output,
            )
        newest = list_checkpoints(out)[-1]
        state = json.loads((newest / "trainer_state.json").read_text())
        assert state["step"] == stopped and [s["shard_id"] for s in state["loaders"]] == [0, 1], (
            kind,
            output,
        )
    done = torchrun({"report": str(tmp_path / "final")}, config, "--resume", "auto")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_identical(weights(out), weights(reference))
    history = lambda run: [
        (h["step"], h["knn_top1"], h["linear_top1"])
        for h in json.loads((run / "train_summary.json").read_text())["history"]
    ]
    assert history(out) == history(reference) and [h[0] for h in history(out)] == [0, 5, 10, 12]


@pytest.mark.slow
def test_sigterm_while_an_evaluation_is_due(shards, tmp_path, reference, monkeypatch, capsys):
    """The signal arrives as step 5 (an evaluation step) is fetched: step 5 is checkpointed, the evaluation is not run
    (it could outlast the launcher's grace period) and the resumed run evaluates first. A signal during an evaluation
    stops it at once: the checkpoint of its step is already written."""
    evaluating = dict(
        eval_every_epochs=1.25,
        eval_train_shards=str(shards),
        eval_val_shards=str(shards),
        eval_knn_k=5,
    )
    real_step, steps = train.train_step, []

    def signalled_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train, "train_step", signalled_step)
    out = tmp_path / "due"
    assert run_train(out, shards, **evaluating) == 75
    assert "preempted at step 5" in capsys.readouterr().out
    state = json.loads((list_checkpoints(out)[-1] / "trainer_state.json").read_text())
    assert state["step"] == 5 and [h["step"] for h in state["history"]] == [0]
    monkeypatch.setattr(train, "train_step", real_step)
    assert run_train(out, shards, "--resume", "auto", **evaluating) == 0
    assert "eval @ epoch 1.25" in capsys.readouterr().out
    assert [h["step"] for h in json.loads((out / "train_summary.json").read_text())["history"]] == [
        0,
        5,
        6,
    ]
    assert_identical(weights(out), reference)

    import simclr_dali.evaluation.monitor as monitor_module

    real_metrics = monitor_module.frozen_metrics

    def signalled_probe(*args, **kwargs):
        if kwargs.get("progress") is False and steps_done(out2) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_metrics(*args, **kwargs)

    out2 = tmp_path / "during"
    monkeypatch.setattr(monitor_module, "frozen_metrics", signalled_probe)
    assert run_train(out2, shards, **evaluating) == 75
    assert "preempted at step 5" in capsys.readouterr().out and names(out2) == ["step_00000005"]


def steps_done(out: Path) -> int:
    found = list_checkpoints(out)
    return json.loads((found[-1] / "trainer_state.json").read_text())["step"] if found else 0


# --------------------------------------------------------------------------- bad data


@pytest.mark.slow
def test_a_corrupt_jpeg_mid_epoch_stops_every_rank_with_a_checkpoint(shards, tmp_path):
    """An image of rank 1's last batch of the epoch does not decode: both ranks stop cleanly (no hang), the shard and
    key
    are named, a checkpoint of the last good step is written, and once the image is repaired the run resumes."""
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    order = DaliLoader(data, 8, TwoViews(), train=True, num_shards=2, shard_id=1)._epoch_shards(0)
    samples = [(tar, s) for tar in order for s in read_index(tar).samples]
    tar, sample = samples[35 + 3 * 8 + 2]  # rank 1 reads samples 35..69: its 4th batch of 8
    offset, size, member = sample["jpg"]
    original = tar.read_bytes()
    with open(
        tar, "r+b"
    ) as handle:  # same length, so the index stays valid: only the decoder can tell
        handle.seek(offset)
        handle.write((b"\xff\xd8\xff\xdb" + bytes(range(256)) * (size // 256 + 1))[:size])
    out = tmp_path / "bad"
    config = write_config(
        tmp_path / "bad.yaml",
        data,
        output_dir=str(out),
        checkpoint_every=None,
        shuffle_buffer=1,
        prefetch=1,
        max_steps=8,
    )
    done = torchrun({"report": str(tmp_path / "report")}, config, timeout=300)
    output = done.stdout + done.stderr
    rank0, rank1 = reports(tmp_path / "report")
    assert rank0["status"] == rank1["status"] == 2, output[-3000:]
    key = member.split(".")[0]
    assert (
        "bad data on rank 1: an image failed to decode" in output
        and f"shard {tar} key {key}" in output
    ), output[-3000:]
    state = json.loads((list_checkpoints(out)[-1] / "trainer_state.json").read_text())
    assert (
        1 <= state["step"] == rank0["steps"] == rank1["steps"] < 4
        and "restarts" in state["data_position"]
    )
    tar.write_bytes(original)
    done = torchrun({"report": str(tmp_path / "report2")}, config, "--resume", "auto", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 8


# ------------------------------------------------------------- bad input: one line, the flag or file named, status 2


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--epochs", "inf"], "epochs"),
        (["--epochs", "nan"], "epochs"),
        (["--timm_kwargs", '{"bogus": 1}'], "bogus"),
        (["--timm_kwargs", '{"num_classes": 10}'], "num_classes"),
        (
            ["--timm_kwargs", '{"pretrained_cfg_overlay": {"file": "/etc/passwd"}}'],
            "pretrained_cfg_overlay",
        ),
        (["--backbone", "notamodel"], "backbone 'notamodel' is not a timm model"),
        (["--backbone", "vit_tiny_patch16_224"], "cifar_stem"),
        (["--resume", "/nonexistent"], "resume=/nonexistent"),
        (["--resume", ""], "resume"),
        (["--checkpoint_every_minutes", "0"], "checkpoint_every_minutes"),
        (["--batch_size", "0"], "batch_size"),
        (["--config", "BROKEN_YAML"], "broken.yaml"),
    ],
)
def test_bad_train_input_is_named_in_one_line(
    shards, tmp_path, capsys, no_heavy_work, flags, named
):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train_shards: x\nepochs: [3,\n")
    flags = [str(broken) if f == "BROKEN_YAML" else f for f in flags]
    assert run_train(tmp_path / "run", shards, *flags) == 2
    assert named in one_error_line(capsys.readouterr())


def test_resuming_a_checkpoint_of_another_architecture_is_named(
    two_steps, tmp_path, capsys, no_heavy_work
):
    newest = two_steps / "checkpoints" / "step_00000002"
    assert (
        run_train(
            tmp_path / "run",
            shards_of(two_steps),
            "--resume",
            newest,
            backbone="resnet34",
            timm_kwargs={},
        )
        == 2
    )
    message = one_error_line(capsys.readouterr())
    assert (
        str(newest) in message
        and "backbone: 'resnet18' -> 'resnet34'" in message
        and "timm_kwargs" in message
    )


@pytest.fixture(scope="module")
def data_for_evaluate(shards) -> list[str]:
    return ["--train_shards", str(shards), "--val_shards", str(shards), "--local_batch_size", "16"]


@pytest.mark.parametrize(
    "case,named",
    [
        ("corrupt backbone.json", "backbone.json cannot be read as JSON"),
        ("num_classes in timm_kwargs", "'num_classes' is not accepted"),
        ("checkpoint_path in timm_kwargs", "'checkpoint_path' is not accepted"),
        ("--local_batch_size 0", "--local_batch_size must be >= 1"),
        ("--batch-size 0", "unrecognized arguments: --batch_size 0"),
        ("--k 0", "--k must be integers >= 1"),
        ("--json BLOCKED/report.json", "--json's directory"),
    ],
)
def test_bad_evaluate_input_is_named_in_one_line(
    two_steps, data_for_evaluate, tmp_path, capsys, case, named
):
    run = tmp_path / "exported"
    run.mkdir()
    shutil.copy(two_steps / "backbone.safetensors", run / "backbone.safetensors")
    meta = json.loads((two_steps / "backbone.json").read_text())
    args = ["--checkpoint", str(run), "--protocol", "knn", *data_for_evaluate]
    if case == "corrupt backbone.json":
        (run / "backbone.json").write_text('{"model_name": "resnet18", "timm_kwargs": {')
    elif case.endswith("in timm_kwargs"):
        (run / "backbone.json").write_text(
            json.dumps({**meta, "timm_kwargs": {**meta["timm_kwargs"], case.split()[0]: 10}})
        )
    else:
        (run / "backbone.json").write_text(json.dumps(meta))
        (tmp_path / "a-file").write_text("not a directory")
        args += case.replace("BLOCKED", str(tmp_path / "a-file")).split()
    assert evaluate.main(args) == 2
    assert named in one_error_line(capsys.readouterr())


# --------------------------------------------------------------------------- file modes on shared filesystems


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_written_has_the_mode_open_gives_under_the_umask(tmp_path, umask, capsys):
    """Shards, their indexes, classes.json, shardset.json, run.json, config.yaml, the checkpoints, the exports
    (backbone.safetensors/.json and timm's backbone/ directory), the summaries, the evaluation JSON and the
    features cache: each file 0666 and each directory 0777 less the umask, as ``open``/``mkdir`` make them (an
    atomic write through a private 0600 temporary would keep other users of a shared filesystem out)."""
    previous = os.umask(umask)
    try:
        root = tmp_path / "written"
        root.mkdir()
        with open(root / "plain", "w"):  # the reference: what open gives here, under this umask
            pass
        file_mode, dir_mode = (root / "plain").stat().st_mode & 0o777, 0o777 & ~umask
        assert file_mode == 0o666 & ~umask
        shards, _ = make_shards(root / "shards", 40, num_classes=4, per_shard=20)
        out = root / "run"
        standard_stem = {
            "cifar_stem": False,
            "timm_kwargs": {"channels": [8, 16, 32, 64]},
        }  # backbone/ too
        evaluating = dict(
            eval_every_epochs=1.0, eval_train_shards=str(shards), eval_val_shards=str(shards)
        )
        evaluating.update(eval_knn_k=5, eval_json=str(out / "curve.json"))
        assert (
            run_train(out, shards, max_steps=2, checkpoint_every=1, **standard_stem, **evaluating)
            == 0
        )
        flags = [
            "--checkpoint",
            str(out),
            "--train_shards",
            str(shards),
            "--val_shards",
            str(shards),
        ]
        flags += [
            "--k",
            "5",
            "--json",
            str(root / "eval.json"),
            "--features_cache",
            str(root / "features"),
        ]
        assert evaluate.main(flags) == 0
    finally:
        os.umask(previous)
    capsys.readouterr()
    kinds = {
        ".tar",
        ".idx",
        "classes.json",
        "shardset.json",
        "run.json",
        "config.yaml",
        "manifest.json",
    }
    kinds |= {
        "backbone.safetensors",
        "backbone.json",
        "model.safetensors",
        "eval.json",
        "curve.json",
    }
    seen, wrong = set(), []
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        if mode != (dir_mode if path.is_dir() else file_mode):
            wrong.append(f"{path.relative_to(root)} {mode:o}")
        seen |= {path.suffix, path.name}
    assert not wrong, (
        f"umask {umask:03o}: expected files {file_mode:o}, directories {dir_mode:o}: {wrong}"
    )
    assert kinds <= seen, kinds - seen
    assert (out / "backbone").is_dir() and any((root / "features").iterdir())

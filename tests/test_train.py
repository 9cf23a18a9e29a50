"""train.py end to end on the CPU: a tiny run + evaluation, exact resume, preemption, non-finite loss,
bad configuration, and 2 gloo processes matching 1 process on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, make_shards, tiny
from safetensors.torch import load_file

from simclr_dali import evaluate, train
from simclr_dali.model.settings import MODEL_FIELDS
from simclr_dali.trainer.config import ConfigError, ModelConfig, TrainConfig, load_config

TINY = tiny()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory, _ = make_shards(tmp_path_factory.mktemp("train"), 70, num_classes=12, per_shard=30)
    return directory


def write_config(path, shards, **overrides):
    config = {**TINY, "train_shards": str(shards), **overrides}
    path.write_text(yaml.safe_dump(config))
    return path


def flags(**values):
    return [
        f"--{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in values.items()
    ]


def run_train(tmp_path, shards, name, **overrides):
    config = write_config(tmp_path / f"{name}.yaml", shards, output_dir=str(tmp_path / name))
    return train.main(["--config", str(config), *flags(**overrides)])


def test_tiny_run_trains_exports_and_evaluates(tmp_path, shards, capsys):
    assert run_train(tmp_path, shards, "run", max_steps=5) == 0
    out = tmp_path / "run"
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["model_name"] == "resnet18" and meta["num_features"] == 64
    state = load_file(str(out / "backbone.safetensors"))
    assert "conv1.weight" in state and state["conv1.weight"].shape[-1] == 3  # the CIFAR stem
    summary = json.loads((out / "train_summary.json").read_text())
    assert (
        summary["steps"] == 5
        and summary["mean_images_per_s"] > 0
        and 0 <= summary["data_wait_fraction"] <= 1
    )
    assert (out / "checkpoints").is_dir() and len(
        list((out / "checkpoints").iterdir())
    ) == 1  # the final one
    report = tmp_path / "eval.json"
    assert (
        evaluate.main(
            [
                "--checkpoint",
                str(out),
                "--train_shards",
                str(shards),
                "--val_shards",
                str(shards),
                "--protocol",
                "knn",
                "--json",
                str(report),
                "--compare_random_init",
                "true",
            ]
        )
        == 0
    )
    results = json.loads(report.read_text())["results"]
    assert len(results) == 2 and all(0 <= r["metrics"]["knn200_top1"] <= 100 for r in results)


def test_time_budget_ends_the_run_with_a_final_eval_checkpoint_and_export(tmp_path, shards, capsys):
    curve = tmp_path / "curve.json"
    assert (
        run_train(
            tmp_path,
            shards,
            "budget",
            max_steps=50,
            max_train_minutes=1e-6,
            eval_every_epochs=10,
            eval_train_shards=str(shards),
            eval_val_shards=str(shards),
            eval_json=str(curve),
        )
        == 0
    )
    assert "time budget" in capsys.readouterr().out
    out = tmp_path / "budget"
    assert (
        json.loads((out / "train_summary.json").read_text())["steps"] == 1
    )  # checked every log_every (= 1) steps
    assert [h["step"] for h in json.loads(curve.read_text())["history"]] == [
        0,
        1,
    ]  # random init, then the budget's end
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"] and (
        out / "backbone.safetensors"
    ).exists()


def test_tensorboard_meters_are_logged(tmp_path, shards):
    assert run_train(tmp_path, shards, "tb", max_steps=2, tracker="tensorboard") == 0
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"loss", "lr", "images_per_s", "data_wait_fraction", "pos_acc"} <= tags


def test_a_resumed_run_continues_its_tracker_run_and_log(tmp_path, shards):
    """TensorBoard: the resumed run writes into the same log directory (events after the resumed step dropped);
    OUTPUT_DIR/train.log holds what both starts printed, with the meters of every logged step."""
    assert (
        run_train(tmp_path, shards, "tb", max_steps=2, tracker="tensorboard", checkpoint_every=1)
        == 0
    )
    assert run_train(tmp_path, shards, "tb", max_steps=3, tracker="tensorboard", resume="auto") == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb" / "simclr"
    assert (
        len(list(logdir.glob("events.out.tfevents.*"))) == 2
    )  # one per start, in the same directory
    accumulator = EventAccumulator(str(logdir))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("loss")] == [
        1,
        2,
        3,
    ]  # one curve, no step twice
    run_id = json.loads((tmp_path / "tb" / "run.json").read_text())["run_id"]
    log = (tmp_path / "tb" / "train.log").read_text()
    assert f"run {run_id} started" in log and f"run {run_id} resumed from" in log
    assert (
        all(f" step {n}: loss " in log for n in (1, 2, 3))
        and "resume applies the changed max_steps: 2 -> 3" in log
    )


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, shards, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert run_train(tmp_path, shards, "wb", max_steps=2, tracker="wandb", checkpoint_every=1) == 0
    assert run_train(tmp_path, shards, "wb", max_steps=3, tracker="wandb", resume="auto") == 0
    run_id = json.loads((tmp_path / "wb" / "run.json").read_text())["run_id"]
    offline = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline), offline


def test_export_loads_with_timm(tmp_path, shards):
    import timm

    assert run_train(tmp_path, shards, "plain", max_steps=2, cifar_stem=False) == 0
    weights = tmp_path / "plain" / "backbone.safetensors"
    model = timm.create_model(
        "resnet18",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(weights)),
        num_classes=0,
        channels=[8, 16, 32, 64],
    )
    trained = load_file(str(weights))
    assert torch.equal(
        model.state_dict()["layer4.1.conv2.weight"], trained["layer4.1.conv2.weight"]
    )
    # timm's own local-directory convention: the architecture (with its timm arguments) comes from config.json
    local = timm.create_model(f"local-dir:{tmp_path / 'plain' / 'backbone'}", pretrained=True)
    assert local.num_classes == 0 and all(
        torch.equal(local.state_dict()[k], trained[k]) for k in trained
    )


@pytest.mark.slow
def test_resume_is_exact_mid_epoch_and_at_epoch_end(tmp_path, shards):
    """70 samples / batch 16 = 4 steps per epoch: stop at step 3 (mid-epoch), resume and stop at 4
    (the epoch's end), resume to step 7: the parameters equal an uninterrupted 7-step run exactly."""
    assert run_train(tmp_path, shards, "straight", max_steps=7) == 0
    assert run_train(tmp_path, shards, "resumed", max_steps=3) == 0
    assert run_train(tmp_path, shards, "resumed", max_steps=4, resume="auto") == 0
    assert run_train(tmp_path, shards, "resumed", max_steps=7, resume="auto") == 0
    straight = load_file(str(tmp_path / "straight" / "backbone.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "backbone.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_matches(tmp_path, shards):
    """Preemption: SIGTERM to a plain `python train.py` mid-run writes a checkpoint and exits with status 75;
    resuming gives exactly the parameters of an uninterrupted run."""
    total = 12  # 3 epochs of 4 steps; the signal comes as the loop starts, so the run stops after step 1 or 2
    assert run_train(tmp_path, shards, "reference", max_steps=total) == 0
    config = write_config(
        tmp_path / "killed.yaml", shards, output_dir=str(tmp_path / "killed"), max_steps=total
    )
    process = subprocess.Popen(
        [sys.executable, "train.py", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"},
    )
    lines = []
    for line in process.stdout:  # wait until the loop is about to start, then preempt it
        lines.append(line)
        if "steps/epoch" in line:
            break
    process.send_signal(signal.SIGTERM)
    output = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == 75, output
    assert "preempted at step" in output and "with --resume auto" in output, output
    assert not (tmp_path / "killed" / "backbone.safetensors").exists()  # it stopped early
    assert run_train(tmp_path, shards, "killed", max_steps=total, resume="auto") == 0
    reference = load_file(str(tmp_path / "reference" / "backbone.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "backbone.safetensors"))
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_non_finite_loss_stops_naming_the_step(tmp_path, shards, capsys):
    status = run_train(
        tmp_path,
        shards,
        "nan",
        max_steps=6,
        optimizer="sgd",
        lr=1e30,
        lr_scaling="none",
        warmup_epochs=0,
        checkpoint_every=1,
    )
    assert status == 3
    output = capsys.readouterr().err
    assert "non-finite loss or parameters at step" in output
    bad_step = int(output.split("non-finite loss or parameters at step")[1].split(";")[0])
    checkpoints = sorted(
        p.name for p in (tmp_path / "nan" / "checkpoints").iterdir() if not p.name.startswith(".")
    )
    assert checkpoints and all(
        int(name.split("_")[1]) < bad_step for name in checkpoints
    )  # only good ones kept
    assert not (tmp_path / "nan" / "backbone.safetensors").exists()


@pytest.mark.parametrize(
    "override,field",
    [
        ({"batch_size": "sixteen"}, "batch_size"),
        ({"precision": "fp8"}, "precision"),
        ({"temperature": "0.001"}, "temperature"),
        ({"warmup_epochs": "5"}, "warmup_epochs"),
        ({"train_shards": "/nowhere/x-{000..003}.tar"}, "does not exist"),
        ({"cifar_stem": "maybe"}, "cifar_stem"),
    ],
)
def test_bad_config_values_are_named(tmp_path, shards, capsys, override, field):
    assert run_train(tmp_path, shards, "bad", **override) == 2
    captured = capsys.readouterr()
    assert field in captured.err + captured.out


def test_unknown_key_in_yaml_is_named(tmp_path, shards):
    config = write_config(tmp_path / "c.yaml", shards, learning_rat=0.1)
    with pytest.raises(ConfigError, match="learning_rat.*c.yaml"):
        load_config(config)
    assert train.main(["--config", str(config)]) == 2


def test_batch_must_divide_over_processes():
    with pytest.raises(
        ConfigError, match="batch_size 30 is not divisible by the number of processes \\(4\\)"
    ):
        TrainConfig(train_shards="x", batch_size=30).validate(world_size=4)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """Global BN + gathered NT-Xent + DDP averaging: 2 gloo ranks holding half the batch each end with
    the parameters of 1 process on the whole batch."""
    script = ROOT / "tests" / "distributed_steps.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one.pt")],
        cwd=ROOT,
        check=True,
        env=env,
        timeout=300,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path / "two.pt"),
        ],
        cwd=ROOT,
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
    )
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys()
    for key in one:
        if one[key].is_floating_point():
            assert torch.allclose(one[key], two[key], rtol=1e-4, atol=1e-5), key
    assert any(
        not torch.equal(one[k], torch.zeros_like(one[k])) for k in one if "running_mean" in k
    )


@pytest.mark.slow
def test_two_process_training_run_with_the_real_loader(tmp_path, shards):
    """torchrun + Accelerate(cpu) + DALI loaders sharded by rank + per-rank loader checkpoints + resume."""
    config = write_config(
        tmp_path / "ddp.yaml", shards, output_dir=str(tmp_path / "ddp"), max_steps=2
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "train.py",
        "--config",
        str(config),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "2 process(es)" in result.stdout
    state = json.loads(
        next((tmp_path / "ddp" / "checkpoints").glob("step_*/trainer_state.json")).read_text()
    )
    assert state["step"] == 2 and [s["shard_id"] for s in state["loaders"]] == [0, 1]
    result = subprocess.run(
        command + ["--resume", "auto", "--max_steps", "3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and "resumed from" in result.stdout, (
        result.stdout[-2000:] + result.stderr[-2000:]
    )


def test_loss_receives_16_bit_projections_under_bf16_autocast(monkeypatch):
    """Under bf16 mixed precision the projections reach NT-Xent as bf16 (the head ends in BatchNorm1d: what
    autocast hands on is checked, not assumed), so the fused kernels get tensor-core operands; the loss and the
    step still run and update the weights."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    import simclr_dali.trainer.step  # noqa: F401 (loads the submodule)
    from simclr_dali import trainer
    from simclr_dali.trainer.build import build_model, prepare_for_training
    from simclr_dali.trainer.optim import build_optimizer

    seen = []
    loss_fn = trainer.step.nt_xent
    monkeypatch.setattr(
        trainer.step,
        "nt_xent",
        lambda z1, z2, *args, **kwargs: (
            seen.append((z1.dtype, z2.dtype)) or loss_fn(z1, z2, *args, **kwargs)
        ),
    )
    model = {k: v for k, v in TINY.items() if k in MODEL_FIELDS}
    cfg = TrainConfig(
        train_shards="x",
        model=ModelConfig(**model),
        batch_size=8,
        precision="bf16",
        temperature=0.2,
    )
    AcceleratorState._reset_state(
        True
    )  # earlier tests in this process made an Accelerator without mixed precision
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = build_model(cfg, "cpu", 1)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = prepare_for_training(accelerator, model, optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    views = [
        torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last) for _ in range(2)
    ]
    out = trainer.step.train_step(model, optimizer, *views, cfg, accelerator)
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert torch.isfinite(out.loss) and any(
        not torch.equal(a, b) for a, b in zip(before, model.parameters())
    )


def test_tracker_project_name_tags_and_init_kwargs_reach_wandb(tmp_path, shards, monkeypatch):
    """W&B's project is $WANDB_PROJECT when tracker_project is unset (Accelerate's init_trackers(project) would
    override it), then the field; name, tags, entity and tracker_init_kwargs go to wandb.init."""
    wandb = pytest.importorskip("wandb")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "from-environment")
    seen, real_init = [], wandb.init

    def recording_init(*args, **kwargs):  # the real wandb.init, with what it was given recorded
        run = real_init(*args, **kwargs)
        seen.append(
            {"project": run.project, "name": run.name, "tags": list(run.tags), "group": run.group}
        )
        return run

    monkeypatch.setattr(wandb, "init", recording_init)
    flags = dict(
        max_steps=1, tracker="wandb", tracker_run_name="demo-a", tracker_tags=["cpu", "tiny"]
    )
    assert (
        run_train(tmp_path, shards, "env", **flags, tracker_init_kwargs={"group": "sweep-3"}) == 0
    )
    assert run_train(tmp_path, shards, "field", **flags, tracker_project="from-config") == 0
    assert seen == [
        {
            "project": "from-environment",
            "name": "demo-a",
            "tags": ["cpu", "tiny"],
            "group": "sweep-3",
        },
        {"project": "from-config", "name": "demo-a", "tags": ["cpu", "tiny"], "group": ""},
    ]


def test_progress_false_prints_the_meters_as_lines(tmp_path, shards, capsys):
    """--progress false (log files): no progress bar; each logged step's meters on a line of their own. The
    TensorBoard log directory is tracker_project's."""
    assert (
        run_train(
            tmp_path,
            shards,
            "quiet",
            max_steps=2,
            progress=False,
            tracker="tensorboard",
            tracker_project="tb-project",
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "train:" not in captured.err and "\r" not in captured.err + captured.out, captured.err[
        -2000:
    ]
    assert all(f"step {n}: loss " in captured.out for n in (1, 2)), captured.out[-2000:]
    assert list((tmp_path / "quiet" / "tb-project").glob("events.out.tfevents.*"))

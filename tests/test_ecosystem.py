"""The project among its neighbours: it installs one namespace (simclr_dali) and nothing that shadows another
distribution, its console scripts run from any directory in a fresh venv, its CLIs document every flag, timm's
norm + activation layers survive global BN, and Accelerate's multi-node recipe really starts one process per
machine."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, build_wheel, make_shards, tiny

from simclr_dali.model.global_bn import GlobalBatchNorm, GlobalBatchNormAct, convert_to_global_bn
from simclr_dali.trainer.config import ModelConfig, TrainConfig

PROJECT_MODULES = [
    "evaluate",
    "train",
    "bench",
    "pipeline",
    "model",
    "trainer",
    "evaluation",
    "common",
]
CONSOLE_SCRIPTS = [
    "simclr-train",
    "simclr-evaluate",
    "simclr-shards",
    "simclr-bench",
    "simclr-export",
]


def test_installed_project_shadows_no_other_distribution(tmp_path):
    """Hugging Face's `evaluate` (installed beside the project by the test extra) is what `import evaluate`
    gives outside the checkout; none of the project's generic top-level names is importable from there."""
    probe = (
        "import importlib.util, json; "
        "print(json.dumps({name: (lambda s: s and s.origin)(importlib.util.find_spec(name)) "
        f"for name in {PROJECT_MODULES!r}}}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = json.loads(
        subprocess.run(
            [sys.executable, "-c", probe],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert found["evaluate"] and "site-packages" in found["evaluate"], found
    import_from = subprocess.run(
        [
            sys.executable,
            "-c",
            "import evaluate; print(evaluate.__file__, hasattr(evaluate, 'load'))",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert (
        import_from[0] == found["evaluate"] and import_from[1] == "True"
    )  # Hugging Face's, with its evaluate.load
    assert all(origin is None or "site-packages" in origin for origin in found.values()), (
        found
    )  # none is the checkout's
    # The installed distribution's one top-level name is its namespace, and (editable) it is this checkout.
    installed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.metadata as m, simclr_dali, simclr_dali.bench as b; "
            "print(m.distribution('simclr-dali').read_text('top_level.txt').strip(), simclr_dali.__file__, b.main)",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert installed[0] == "simclr_dali" and Path(installed[1]) == ROOT / "__init__.py", installed
    assert "function main" in " ".join(
        installed[2:]
    )  # simclr_dali.bench is bench/, whose main dispatches


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The distribution as `pip install .` builds it (no build isolation: setuptools comes from this venv)."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_holds_one_namespace_with_the_layout_and_the_console_scripts(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt")).rsplit("/", 1)[0]
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        top_level = archive.read(f"{info}/top_level.txt").decode().split()
    assert top_level == ["simclr_dali"] and {n.split("/")[0] for n in names} == {
        "simclr_dali",
        info,
    }
    for module in (
        "__init__",
        "train",
        "evaluate",
        "pipeline/shards/cli",
        "model/simclr",
        "trainer/export",
        "bench/__init__",
    ):
        assert f"simclr_dali/{module}.py" in names, module
    for package in (
        "pipeline",
        "pipeline/shards",
        "model",
        "trainer",
        "evaluation",
        "common",
        "bench",
    ):
        assert f"simclr_dali/{package}/__init__.py" in names, package
    assert (
        "simclr_dali/bench.py" not in names
    )  # the checkout's shim over bench/: it would be shadowed
    assert f"{info}/licenses/LICENSE" in names
    assert all(f"{script} = simclr_dali." in entry_points for script in CONSOLE_SCRIPTS), (
        entry_points
    )


@pytest.mark.slow
def test_console_scripts_run_from_another_directory_in_a_fresh_venv(wheel, tmp_path):
    """`pip install` of the wheel into a new venv (its dependencies seen through a .pth file naming this venv's
    site-packages, whose editable finder stays inactive there), then from a directory outside the checkout:
    every command's --help, and shards -> 1 training step -> export with the installed copy."""
    fresh = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True, timeout=120
    )
    python = fresh / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "simclr_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }

    def run(*command: str) -> str:
        result = subprocess.run(
            command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
        return result.stdout

    origin = run(str(python), "-c", "import simclr_dali.train as t; print(t.__file__)").strip()
    assert Path(origin).is_relative_to(fresh), origin  # the installed copy, not the checkout
    for script in CONSOLE_SCRIPTS:
        assert (
            "usage" in run(str(fresh / "bin" / script), "--help").lower()
            or script == "simclr-bench"
        ), script
    bin_ = fresh / "bin"
    run(
        str(bin_ / "simclr-shards"),
        "write",
        "synthetic",
        "shards/train-%06d.tar",
        "--num_classes",
        "4",
        "--per_class",
        "8",
        "--quiet",
    )
    run(
        str(bin_ / "simclr-train"),
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        "--train_shards",
        "shards",
        "--output_dir",
        "run",
        "--max_steps",
        "1",
        "--batch_size",
        "8",
        "--epochs",
        "1",
        "--warmup_epochs",
        "0",
        "--timm_kwargs",
        '{"channels": [8, 16, 32, 64]}',
        "--proj_hidden",
        "16",
        "--data_threads",
        "1",
    )
    assert "exported" in run(str(bin_ / "simclr-export"), "run")
    assert (elsewhere / "run" / "exports" / "step_00000001" / "head.safetensors").is_file()


def test_train_help_lists_every_field_with_its_documentation():
    result = subprocess.run(
        [sys.executable, "train.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # help wraps lines
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name} " in text or f"--{field.name}," in text, field.name
        doc = _field_doc(field.name)
        assert doc, f"{field.name} has no docstring in trainer/config.py"
        assert " ".join(doc.split()[:6]) in text, (field.name, doc)
    assert "{imagenet,cifar}" in text and "{no,bf16,fp16}" in text  # Literal choices
    assert "default: null" in text  # None spelled as YAML's null for "unset"


def _field_doc(name: str) -> str:
    """The attribute docstring under ``name`` in TrainConfig's source."""
    lines = (ROOT / "trainer" / "config.py").read_text().splitlines()
    for number, line in enumerate(lines):
        if line.strip().startswith(f"{name}:"):
            following = lines[number + 1].strip()
            return following.strip('"') if following.startswith('"""') else ""
    return ""


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnetv2_50", "mobilenetv3_small_050"])
def test_global_bn_keeps_timm_norm_act_layers_whole(name):
    """timm's BatchNormAct2d carries the activation: converting to global BN must keep it (and the drop
    layer). One process: the converted model computes exactly what the original does, training and eval."""
    import timm
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0)
    norm_act = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert norm_act > 0
    x = torch.randn(4, 3, 64, 64)
    reference = {
        mode: getattr(model, mode)()(x).detach() for mode in ("train", "eval")
    }  # train mode updates stats: eval second
    torch.manual_seed(0)
    converted = convert_to_global_bn(timm.create_model(name, num_classes=0), "cpu")
    assert sum(isinstance(m, GlobalBatchNormAct) for m in converted.modules()) == norm_act
    assert not [
        m
        for m in converted.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and not isinstance(m, GlobalBatchNorm)
    ]
    for mode in ("train", "eval"):
        assert torch.equal(getattr(converted, mode)()(x), reference[mode]), mode


@pytest.mark.slow
def test_norm_act_model_two_processes_match_one_process(tmp_path):
    """A model made of BatchNormAct2d layers (MobileNetV3) trained by 2 gloo ranks with global BN equals 1
    process on the whole batch (tests/distributed_steps.py with another backbone)."""
    script = ROOT / "tests" / "distributed_steps.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIMCLR_TEST_BACKBONE": "mobilenetv3_small_050"}
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
    assert one.keys() == two.keys() and any("bn" in k for k in one)
    for key in one:
        if one[key].is_floating_point():
            assert torch.allclose(one[key], two[key], rtol=1e-4, atol=1e-5), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multinode_recipe_starts_two_machines_on_localhost(tmp_path):
    """configs/accelerate/multinode.yaml launched as two machines of one process each on this host (what
    docker/slurm.sbatch runs once per node). Overrides for a CPU host: --num_processes 2 (one process per
    machine instead of 8) and --main_process_ip 127.0.0.1; the accelerate config is used as written (train.py
    itself picks the CPU when no GPU is present). Training runs with world size 2 and both ranks checkpoint."""
    shards, _ = make_shards(tmp_path / "shards", 40, num_classes=4, per_shard=20)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            tiny(
                "lr",
                "temperature",
                "checkpoint_every",
                train_shards=str(shards),
                batch_size=8,
                epochs=2,
                max_steps=2,
                output_dir=str(tmp_path / "run"),
            )
        )
    )
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "configs/accelerate/multinode.yaml",
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
    ]
    machines = [
        subprocess.Popen(
            [*command, "--machine_rank", str(rank), "train.py", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [machine.communicate(timeout=600)[0] for machine in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 process(es)" in outputs[0], outputs[0][-3000:]
    state = json.loads(
        next(Path(tmp_path / "run" / "checkpoints").glob("step_*/trainer_state.json")).read_text()
    )
    assert state["step"] == 2 and [s["shard_id"] for s in state["loaders"]] == [0, 1]


def test_pretrained_flag_starts_from_timms_weights(monkeypatch):
    """`--pretrained true` asks timm for its pretrained weights (timm downloads them; not done here)."""
    import timm

    from simclr_dali.trainer.build import build_model

    calls = []
    create = timm.create_model
    monkeypatch.setattr(
        timm,
        "create_model",
        lambda name, **kwargs: (
            calls.append(kwargs) or create(name, **{**kwargs, "pretrained": False})
        ),
    )
    cfg = TrainConfig(
        train_shards="x",
        model=ModelConfig(
            backbone="resnet18",
            pretrained=True,
            proj_hidden=16,
            proj_dim=8,
            timm_kwargs={"channels": [8, 16, 32, 64]},
        ),
    )
    build_model(cfg, "cpu", 1)
    assert calls and calls[0]["pretrained"] is True and calls[0]["num_classes"] == 0

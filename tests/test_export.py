"""simclr-export: the backbone and the head of any checkpoint (final, mid-run, or the newest that verifies), for
every preset in configs/ (at tiny widths), loaded in a fresh process with the features of the checkpoint's model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_shards
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file

from simclr_dali import train
from simclr_dali.model.simclr import SimCLR
from simclr_dali.trainer.export import ExportError, export_checkpoint, load_exported, main

PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = {
    "timm_kwargs": {"channels": [8, 16, 32, 64]},  # every preset's backbone is a timm ResNet
    "proj_hidden": 24,
    "proj_dim": 16,
    "batch_size": 8,
    "epochs": 1,
    "warmup_epochs": 0,
    "precision": "no",
    "tracker": "none",
    "eval_every_epochs": None,
    "eval_train_shards": None,
    "eval_val_shards": None,
    "eval_json": None,
    "data_threads": 1,
    "log_every": 1,
}

# Run in a fresh interpreter: the export's own loader (and timm's two recipes where timm can express the model)
# on the inputs in INPUTS, outputs written to OUT.
LOAD = r"""
import sys

import timm
import torch
from safetensors.torch import load_file, save_file

from simclr_dali.trainer.export import load_exported

torch.set_num_threads(1)
export, inputs, out = sys.argv[1:4]
x = load_file(inputs)["x"]
backbone, head, meta = load_exported(export)
with torch.no_grad():
    features = backbone(x)
    result = {"h": features, "z": head(features)}
    if not meta["cifar_stem"]:
        local = timm.create_model(f"local-dir:{export}/backbone", pretrained=True)
        overlay = timm.create_model(
            meta["model_name"],
            pretrained=True,
            pretrained_cfg_overlay=dict(file=f"{export}/backbone.safetensors"),
            num_classes=0,
            **meta["timm_kwargs"],
        )
        result["h_local_dir"] = local.eval()(x)
        result["h_overlay"] = overlay.eval()(x)
save_file({k: v.contiguous() for k, v in result.items()}, out)
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(
        tmp_path_factory.mktemp("export") / "shards", 32, num_classes=4, per_shard=16
    )[0]


def flag(name: str, value) -> str:
    return f"--{name}={'null' if value is None else json.dumps(value) if isinstance(value, (dict, list)) else value}"


def train_preset(preset: Path, shards: Path, out: Path, **overrides) -> int:
    values = {**TINY, "train_shards": str(shards), "output_dir": str(out), **overrides}
    return train.main(["--config", str(preset), *(flag(k, v) for k, v in values.items())])


def checkpoint_outputs(checkpoint: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """(h, z) of the model a checkpoint holds, rebuilt here from its own files, on one thread."""
    config = json.loads((checkpoint / "trainer_state.json").read_text())["config"]["model"]
    model = SimCLR(
        config["backbone"],
        config["proj_hidden"],
        config["proj_dim"],
        cifar_stem=config["cifar_stem"],
        **config["timm_kwargs"],
    )
    model.load_state_dict(load_safetensors((checkpoint / "model.safetensors").read_bytes()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            h, z = model.eval()(x)
    finally:
        torch.set_num_threads(threads)
    return {"h": h, "z": z}


def load_in_fresh_process(export: Path, x: torch.Tensor, work: Path) -> dict[str, torch.Tensor]:
    save_file({"x": x}, str(work / "inputs.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD,
            str(export),
            str(work / "inputs.safetensors"),
            str(work / "outputs.safetensors"),
        ],
        cwd=work,
        env=env,
        check=True,
        timeout=300,
    )
    return load_file(str(work / "outputs.safetensors"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
@pytest.mark.slow
def test_every_presets_export_loads_in_a_fresh_process_with_the_checkpoints_features(
    preset, shards, tmp_path
):
    run = tmp_path / "run"
    assert train_preset(preset, shards, run, max_steps=1) == 0
    assert main([str(run), "--output_dir", str(tmp_path / "export")]) == 0
    export = tmp_path / "export"
    meta = json.loads((export / "backbone.json").read_text())
    assert (
        meta["step"] == 1
        and (export / "head.safetensors").is_file()
        and (export / "head.json").is_file()
    )
    assert (export / "backbone").is_dir() == (
        not meta["cifar_stem"]
    )  # timm's local-dir form where timm has the stem
    size = meta["image_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = checkpoint_outputs(run / "checkpoints" / "step_00000001", x)
    loaded = load_in_fresh_process(export, x, tmp_path)
    assert torch.equal(loaded["h"], expected["h"]) and torch.equal(loaded["z"], expected["z"])
    if not meta["cifar_stem"]:
        assert torch.equal(loaded["h_local_dir"], expected["h"]) and torch.equal(
            loaded["h_overlay"], expected["h"]
        )
    else:  # the CIFAR stem is not timm's: timm alone builds another first convolution
        assert set(loaded) == {"h", "z"}


@pytest.mark.slow
def test_export_takes_any_checkpoint_and_falls_back_past_a_damaged_one(shards, tmp_path):
    """A mid-run checkpoint by its path; from the output directory, the newest checkpoint that verifies
    (the final one damaged: the one before it); errors name the path."""
    run = tmp_path / "run"
    preset = ROOT / "configs" / "demo.yaml"
    assert (
        train_preset(preset, shards, run, max_steps=3, checkpoint_every=1, keep_checkpoints=3) == 0
    )
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    first = run / "checkpoints" / "step_00000001"
    out = export_checkpoint(first)
    assert out == run / "exports" / "step_00000001"
    backbone, head, meta = load_exported(out)
    expected = checkpoint_outputs(first, x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            h = backbone(x)
            assert (
                torch.equal(h, expected["h"])
                and torch.equal(head(h), expected["z"])
                and meta["step"] == 1
            )
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(
        expected["h"], checkpoint_outputs(run / "checkpoints" / "step_00000003", x)["h"]
    )

    weights = run / "checkpoints" / "step_00000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated: fails its manifest's size
    assert json.loads((export_checkpoint(run) / "backbone.json").read_text())["step"] == 2
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "nope")
    with pytest.raises(ExportError, match="neither a checkpoint"):
        export_checkpoint(shards)
    assert main([str(tmp_path / "nope")]) == 2
    # a crash between replace_directory's two renames left the old export aside and none in place: it is put
    # back first, then replaced whole; the dashed flag spelling works here as everywhere
    aside = tmp_path / ".replaced-dashed-0123456789ab" / "dashed"
    aside.mkdir(parents=True)
    (aside / "backbone.json").write_text('{"step": 0}')
    assert main([str(first), "--output-dir", str(tmp_path / "dashed")]) == 0
    assert json.loads((tmp_path / "dashed" / "backbone.json").read_text())["step"] == 1
    assert main([str(run), "--output-dir", str(tmp_path / "dashed")]) == 0
    assert json.loads((tmp_path / "dashed" / "backbone.json").read_text())["step"] == 2
    assert not list(tmp_path.glob(".replaced-*")) and not list(tmp_path.glob(".dashed-*"))


def test_train_exports_the_head_beside_the_backbone(shards, tmp_path):
    run = tmp_path / "run"
    assert train_preset(ROOT / "configs" / "demo.yaml", shards, run, max_steps=1) == 0
    backbone, head, meta = load_exported(run)  # a train.py output directory is an export too
    assert head is not None and json.loads((run / "head.json").read_text()) == {
        "in_dim": 64,
        "hidden_dim": 24,
        "out_dim": 16,
        "num_layers": 2,
    }
    assert meta["cifar_stem"] and not (run / "backbone").exists()

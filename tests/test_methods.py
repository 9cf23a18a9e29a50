"""The SimCLR family (issue 31) in the trainer and the evaluation: SimCLRv2's head (``proj_layers``) and
fine-tuning from inside it (``--ft_proj_selector``), exports carrying the head's depth, ``skresnet*``
backbones, SupCon through the training step (plain and with gradient caching), the online probe (on for
labelled shards, off and said once otherwise, no host read per step), the flags in ``--help``, resume
refusing a changed ``loss`` / ``proj_layers``, and the distillation protocol on tiny data."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, make_shards
from microbatch_steps import TINY
from torch import nn

from simclr_dali.model.simclr import ProjectionHead, SimCLR
from simclr_dali.trainer.build import build_model, prepare_for_training
from simclr_dali.trainer.config import TrainConfig, config_from_dict, parse_args, resume_changes
from simclr_dali.trainer.online_probe import OnlineProbe, probe_enabled, wants_labels
from simclr_dali.trainer.optim import build_optimizer
from simclr_dali.trainer.step import train_step

# --------------------------------------------------------------------------- the projection head


def test_two_layer_head_is_the_first_papers_and_keeps_its_module_names():
    head = ProjectionHead(64, 32, 16)
    assert [type(m).__name__ for m in head] == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
    ]
    assert set(head.state_dict()) >= {
        "0.weight",
        "1.weight",
        "1.bias",
        "3.weight",
        "4.weight",
        "4.running_mean",
    }
    assert not any(m.bias is not None for m in head if isinstance(m, nn.Linear))
    assert not head[4].bias.requires_grad and torch.all(head[4].bias == 0)


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_head_of_any_depth_is_the_official_projection_head(layers):
    """Each layer but the last Linear -> BN (with shift) -> ReLU, the last Linear -> BN without shift; no bias."""
    head = ProjectionHead(64, 32, 16, layers)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    norms = [m for m in head if isinstance(m, nn.BatchNorm1d)]
    assert (
        len(linears) == len(norms) == layers
        and sum(isinstance(m, nn.ReLU) for m in head) == layers - 1
    )
    assert [m.out_features for m in linears] == [32] * (layers - 1) + [16]
    assert all(n.bias.requires_grad for n in norms[:-1]) and not norms[-1].bias.requires_grad
    x = torch.randn(8, 64)
    assert head(x).shape == (8, 16)
    for keep in range(layers + 1):
        assert head.layers(keep)(x).shape == (8, head.out_width(keep) or 64)
    with pytest.raises(ValueError, match="cannot keep"):
        head.layers(layers + 1)
    head.eval()
    assert torch.equal(head.layers(layers)(x), head(x))
    if layers > 1:  # layer 1's output is after its ReLU, as the official hiddens_list
        assert (head.layers(1)(x) >= 0).all()


@pytest.mark.parametrize("name", ["skresnet18", "skresnet34"])
def test_selective_kernel_resnets_run_as_backbones(name):
    """timm's skresnet (SimCLRv2's SK ResNets), CIFAR stem and a 3-layer head: forward and backward."""
    model = SimCLR(name, proj_hidden=32, proj_dim=16, cifar_stem=True, proj_layers=3)
    h, z = model(torch.randn(4, 3, 32, 32))
    assert h.shape == (4, model.feature_dim) and z.shape == (4, 16)
    z.square().sum().backward()
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- configuration


def test_new_flags_are_in_help_and_checked():
    help_text = subprocess.run(
        [sys.executable, "train.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for flag in ("--loss", "supcon", "--model.proj_layers", "--online_probe", "--online_probe_lr"):
        assert flag in help_text, flag
    help_text = subprocess.run(
        [sys.executable, "evaluate.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for flag in (
        "--ft_proj_selector",
        "--distill_shards",
        "--distill_epochs",
        "--distill_temperature",
        "distill",
    ):
        assert flag in help_text, flag
    from simclr_dali.trainer.config import ConfigError

    for bad in ({"model.proj_layers": 0}, {"online_probe_lr": 0.0}, {"online_probe_lr": math.inf}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            config_from_dict({"train_shards": "x", **unflatten(bad)}).validate()
    assert (
        parse_args(["--train_shards", "x", "--loss", "supcon", "--proj_layers", "3"]).loss
        == "supcon"
    )


def unflatten(values: dict) -> dict:
    """{"model.proj_layers": 3} -> {"model": {"proj_layers": 3}}: a dotted field as a config mapping."""
    out: dict = {}
    for name, value in values.items():
        section, _, field = name.rpartition(".")
        (out.setdefault(section, {}) if section else out)[field] = value
    return out


def test_resume_refuses_a_changed_loss_or_head_depth_but_not_the_probe():
    saved = TrainConfig(train_shards="x").to_dict()
    for change, refused in [
        ({"loss": "supcon"}, True),
        ({"model.proj_layers": 3}, True),
        ({"online_probe": False}, False),
        ({"online_probe_lr": 0.5}, False),
    ]:
        applied, refusals = resume_changes(
            saved, config_from_dict({"train_shards": "x", **unflatten(change)})
        )
        name = next(iter(change))
        assert any(line.startswith(name) for line in (refusals if refused else applied)), (
            change,
            applied,
            refusals,
        )
        assert not any(line.startswith(name) for line in (applied if refused else refusals))
    # a checkpoint written before these fields existed counts as their defaults: nothing to refuse
    older = {k: v for k, v in saved.items() if k not in ("loss", "online_probe", "online_probe_lr")}
    older["model"] = {k: v for k, v in saved["model"].items() if k != "proj_layers"}
    assert resume_changes(older, TrainConfig(train_shards="x")) == ([], [])


# --------------------------------------------------------------------------- SupCon through the step


def _step_grads(cfg: TrainConfig, view1, view2, labels):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu", 1)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = prepare_for_training(accelerator, model, optimizer)
    model.eval()  # BN without batch statistics: the micro-batched gradient is then the plain one
    grads = {}
    optimizer.optimizer.register_step_pre_hook(
        lambda *_: grads.update(
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        )
    )
    out = train_step(model, optimizer, view1, view2, cfg, accelerator, labels)
    return out.loss.item(), grads


@pytest.mark.parametrize("micro_batch", [None, 3, 5])
def test_supcon_step_with_and_without_gradient_caching(micro_batch):
    """The SupCon step's loss is SupCon's of the projections (not NT-Xent's), and with micro-batches (gradient
    caching) its gradients are the plain step's to 1e-5 relative per tensor."""
    from simclr_dali.model.supcon import supcon_reference

    torch.manual_seed(1)
    view1, view2 = torch.randn(16, 3, 16, 16), torch.randn(16, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3] * 4)
    cfg = dataclasses.replace(TINY, loss="supcon", micro_batch=None)
    plain_loss, plain = _step_grads(cfg, view1, view2, labels)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu", 1).eval()
    with torch.no_grad():
        _, z = model(torch.cat([view1, view2]))
    expected = supcon_reference(z[:16].double(), z[16:].double(), labels, cfg.temperature).item()
    assert plain_loss == pytest.approx(expected, rel=1e-5)
    if micro_batch:
        loss, grads = _step_grads(
            dataclasses.replace(cfg, micro_batch=micro_batch), view1, view2, labels
        )
        assert loss == pytest.approx(plain_loss, rel=1e-6)
        for name, grad in plain.items():
            error = (grads[name] - grad).norm() / grad.norm().clamp_min(1e-30)
            assert error <= 1e-5, (name, error.item())
    with pytest.raises(ValueError, match="labels"):
        _step_grads(cfg, view1, view2, None)


# --------------------------------------------------------------------------- the online probe


def unlabelled_shards(directory, count: int):
    """``count`` random images without labels (no .cls members, no classes.json)."""
    from conftest import random_images

    from simclr_dali.pipeline.shards.pixel_sources import encode_jpeg
    from simclr_dali.pipeline.shards.writer import Sample, write_shards

    directory.mkdir(parents=True, exist_ok=True)
    samples = (
        Sample(f"{i:08d}", encode_jpeg(image), None, f"u{i}")
        for i, image in enumerate(random_images(count))
    )
    write_shards(samples, str(directory / "u-%06d.tar"), None, total=count, progress=False)
    return directory


def test_online_probe_learns_separable_features_without_host_reads(monkeypatch):
    """On features that carry the label, its running top-1 rises far above chance; ``update`` never reads a
    tensor to the host (item / tolist / bool would sync a GPU every step), ``read`` once."""
    torch.manual_seed(0)
    probe = OnlineProbe(16, 4, lr=0.5, device=torch.device("cpu"))
    assert probe.read() is None
    centres = torch.randn(4, 16) * 3
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor,
            name,
            lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a),
        )
    for _ in range(30):
        labels = torch.randint(0, 4, (32,))
        h = torch.cat([centres[labels], centres[labels]]) + torch.randn(64, 16)
        probe.update(h.requires_grad_(), labels)
    assert reads == [], reads
    monkeypatch.undo()
    first_window = probe.read()
    for _ in range(10):
        labels = torch.randint(0, 4, (32,))
        probe.update(torch.cat([centres[labels], centres[labels]]) + torch.randn(64, 16), labels)
    assert probe.read() > 90.0 and first_window > 40.0


def test_probe_is_on_for_labelled_shards_and_off_otherwise(tmp_path):
    labelled, _ = make_shards(tmp_path / "labelled", 20, num_classes=4)
    cfg = TrainConfig(train_shards=str(labelled))
    assert probe_enabled(cfg) == (True, "") and wants_labels(cfg)
    assert not probe_enabled(dataclasses.replace(cfg, online_probe=False))[0]
    off, why = probe_enabled(dataclasses.replace(cfg, micro_batch=4))
    assert not off and "micro-batches" in why
    off, why = probe_enabled(
        dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, kind="torchvision"))
    )
    assert not off and "torchvision" in why
    unlabelled = unlabelled_shards(tmp_path / "unlabelled", 8)
    cfg = TrainConfig(train_shards=str(unlabelled))
    on, why = probe_enabled(cfg)
    assert not on and str(unlabelled) in why and "no labels" in why and not wants_labels(cfg)
    assert wants_labels(
        dataclasses.replace(cfg, loss="supcon")
    )  # SupCon asks, and the loader will refuse


# --------------------------------------------------------------------------- train.py and evaluate.py end to end


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


TINY_TRAIN = [
    "--image_size", "32", "--augment", "cifar", "--backbone", "resnet18", "--cifar_stem", "true",
    "--timm_kwargs", '{"channels": [8, 16, 32, 64]}', "--proj_hidden", "32", "--proj_dim", "16",
    "--batch_size", "16", "--epochs", "2", "--warmup_epochs", "0", "--max_steps", "4", "--precision", "no",
    "--channels_last", "false", "--optimizer", "sgd", "--lr", "0.1", "--tracker", "none", "--progress", "false",
    "--log_every", "2", "--data_threads", "1", "--shuffle_buffer", "16",
]  # fmt: skip


@pytest.fixture(scope="module")
def supcon_run(tmp_path_factory):
    """A tiny SupCon run with SimCLRv2's head and the online probe, on labelled shards."""
    root = tmp_path_factory.mktemp("methods")
    train, _ = make_shards(root / "train", 64, num_classes=4)
    val, _ = make_shards(root / "val", 32, num_classes=4, seed=1)
    out = root / "run"
    result = _run(
        "train.py", *TINY_TRAIN, "--train_shards", str(train), "--output_dir", str(out), "--loss", "supcon",
        "--proj_layers", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return root, train, val, out, result.stdout + result.stderr


def test_supcon_run_logs_the_probe_and_exports_the_deep_head(supcon_run):
    root, train, val, out, log = supcon_run
    assert "online probe: linear" in log and "online_probe_top1" in log
    assert json.loads((out / "head.json").read_text())["num_layers"] == 3
    from simclr_dali.trainer.export import export_checkpoint, load_exported

    backbone, head, _ = load_exported(out)
    assert head.num_layers == 3
    exported = export_checkpoint(out, root / "export")
    assert load_exported(exported)[1].num_layers == 3
    # resuming with another loss or head depth is refused, naming the field
    for flag, value in (("--loss", "ntxent"), ("--proj_layers", "2")):
        result = _run(
            "train.py", *TINY_TRAIN, "--train_shards", str(train), "--output_dir", str(out), "--resume", "auto",
            "--loss", "supcon", "--proj_layers", "3", flag, value, "--max_steps", "6",
        )  # fmt: skip
        assert result.returncode == 2 and flag[2:] in result.stderr + result.stdout, result.stderr


def test_supcon_on_unlabelled_shards_is_a_clear_error(tmp_path):
    unlabelled_shards(tmp_path, 32)
    result = _run(
        "train.py", *TINY_TRAIN, "--train_shards", str(tmp_path), "--output_dir", str(tmp_path / "run"),
        "--loss", "supcon",
    )  # fmt: skip
    assert (
        result.returncode == 2 and "u-000000.tar" in result.stderr and "label" in result.stderr
    ), result.stderr
    result = _run(
        "train.py", *TINY_TRAIN, "--train_shards", str(tmp_path), "--output_dir", str(tmp_path / "run2"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    log = result.stdout + result.stderr
    assert log.count("online probe off") == 1 and "online_probe_top1" not in log


def test_finetune_from_head_layer_one_and_distill(supcon_run, tmp_path):
    """--ft_proj_selector 1 fine-tunes the backbone + the first head layer; the distilled student's loss goes
    down and it agrees with its teacher more than at the start."""
    root, train, val, out, _ = supcon_run
    report = tmp_path / "report.json"
    result = _run(
        "evaluate.py", "--checkpoint", str(out), "--train_shards", str(train), "--val_shards", str(val),
        "--protocol", "finetune,distill", "--ft_proj_selector", "1", "--label_fraction", "0.5",
        "--finetune_epochs", "1", "--distill_epochs", "3", "--distill_lr", "0.2",
        "--local_batch_size", "16", "--json", str(report), timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads(report.read_text())["results"][0]["metrics"]
    assert metrics["distill_loss_last_epoch"] < metrics["distill_loss_first_epoch"]
    assert metrics["distill_agreement_end"] > metrics["distill_agreement_start"]
    bad = _run(
        "evaluate.py", "--checkpoint", str(out), "--train_shards", str(train), "--val_shards", str(val),
        "--ft_proj_selector", "4",
    )  # fmt: skip
    assert bad.returncode == 2 and "only 3 layers" in bad.stderr


def test_labelled_two_views_yield_the_pairs_labels(small_shards):
    """``LabelledTwoViews``: (view1, view2, labels) batches, the labels each sample's own (over an epoch every
    label at most as often as the set holds it), the views as TwoViews makes them (shape, dtype, different)."""
    from collections import Counter

    from simclr_dali.pipeline.augment import AugmentConfig
    from simclr_dali.pipeline.loader import DaliLoader, LabelledTwoViews

    directory, labels = small_shards
    loader = DaliLoader(
        str(directory), 16, LabelledTwoViews(AugmentConfig.cifar(size=32)), train=True, device="cpu", num_threads=1,
        shuffle_buffer=8,
    )  # fmt: skip
    seen = Counter()
    for view1, view2, batch_labels in loader:
        assert view1.shape == view2.shape == (16, 3, 32, 32) and batch_labels.shape == (16,)
        assert batch_labels.dtype == torch.int64 and not torch.equal(view1, view2)
        seen.update(batch_labels.tolist())
    held = Counter(labels.tolist())
    assert sum(seen.values()) == 16 * loader.steps_per_epoch and all(
        seen[k] <= held[k] for k in seen
    )

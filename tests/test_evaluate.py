"""evaluate.py and the evaluation package on the CPU: kNN and the linear trainer against known answers,
the label subset (class-balanced, seeded, saved), every protocol end to end on tiny shards, 2 gloo
processes matching 1, and bad input named with exit status 2."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import ROOT, random_images

from simclr_dali import evaluate
from simclr_dali.evaluation.knn import knn_predict, topk_accuracy
from simclr_dali.evaluation.linear import evaluate_classifier, train_linear_on_features
from simclr_dali.evaluation.subset import LabelSubset, SubsetError, select_subset, subset_for
from simclr_dali.model.simclr import create_backbone
from simclr_dali.pipeline.loader import AugmentedView, DaliLoader, classifier_augment
from simclr_dali.pipeline.shards.pixel_sources import array_samples, encode_jpeg, synthetic_images
from simclr_dali.pipeline.shards.shardset import ShardError, write_index
from simclr_dali.pipeline.shards.writer import write_shards
from simclr_dali.trainer.export import export_backbone

TINY = {
    "model_name": "resnet18",
    "cifar_stem": True,
    "timm_kwargs": {"channels": [8, 16, 32, 64]},
    "image_size": 32,
    "num_features": 64,
}
CLASSES = ["disc", "square", "triangle", "ring"]


def write_synthetic(directory, per_class: int, seed: int, drop: int = 0):
    images, labels = synthetic_images(len(CLASSES), per_class, 32, seed)
    images, labels = images[: len(images) - drop], labels[: len(labels) - drop]
    write_shards(
        array_samples(images, labels),
        str(directory / "part-%06d.tar"),
        CLASSES,
        total=len(labels),
        max_count=40,
        progress=False,
    )
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Train: 4 shape classes x 25 = 100 samples in 3 shards; val: 43 (odd, so 2 ranks hold 22 + 21)."""
    root = tmp_path_factory.mktemp("eval")
    (root / "train").mkdir()
    (root / "val").mkdir()
    return write_synthetic(root / "train", 25, seed=0), write_synthetic(
        root / "val", 11, seed=1, drop=1
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny backbone exported as train.py does: backbone.safetensors + backbone.json."""
    directory = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    backbone = create_backbone(TINY["model_name"], cifar_stem=True, **TINY["timm_kwargs"])
    return export_backbone(backbone, directory, TINY)


def run_main(args, capsys):
    status = evaluate.main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def shard_args(data):
    return [
        "--train-shards",
        data[0],
        "--val-shards",
        data[1],
        "--local-batch-size",
        16,
    ]  # the dashed spelling: an alias of --local_batch_size


# --------------------------------------------------------------------------- units


def test_knn_on_separable_features_is_perfect_and_chunked():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=generator) * 4
    train_labels, test_labels = torch.arange(200) % 5, torch.arange(53) % 5
    train = centres[train_labels] + 0.1 * torch.randn(200, 16, generator=generator)
    test = centres[test_labels] + 0.1 * torch.randn(53, 16, generator=generator)
    scores = knn_predict(train, train_labels, test, 5, ks=[20], temperature=0.1, chunk=8)[
        20
    ]  # 7 chunks, the last partial
    assert scores.shape == (53, 5)
    assert topk_accuracy(scores, test_labels) == {"top1": 100.0, "top5": 100.0}
    assert torch.allclose(
        scores, knn_predict(train, train_labels, test, 5, ks=[20], temperature=0.1, chunk=1000)[20]
    )


def test_several_k_in_one_pass_equal_separate_passes():
    generator = torch.Generator().manual_seed(1)
    train, test = (
        torch.randn(400, 12, generator=generator),
        torch.randn(90, 12, generator=generator),
    )
    labels = torch.randint(0, 7, (400,), generator=generator)
    together = knn_predict(train, labels, test, 7, ks=[1, 10, 20, 200, 1000], chunk=32)
    for k in (1, 10, 20, 200, 1000):
        alone = knn_predict(train, labels, test, 7, ks=[k], chunk=32)[k]
        assert torch.allclose(together[k], alone), k
    assert not torch.allclose(together[10], together[200])


def test_knn_never_materialises_the_full_similarity_matrix(monkeypatch):
    shapes = []
    original = torch.Tensor.topk
    monkeypatch.setattr(
        torch.Tensor,
        "topk",
        lambda self, *a, **k: shapes.append(tuple(self.shape)) or original(self, *a, **k),
    )
    knn_predict(
        torch.randn(300, 8), torch.randint(0, 3, (300,)), torch.randn(100, 8), 3, ks=[10], chunk=32
    )
    assert shapes and max(s[0] for s in shapes) <= 32  # (chunk, N) blocks, never (100, 300)


def test_linear_on_random_labels_is_chance_and_learns_real_ones():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3000, 32, generator=generator)
    labels = torch.randint(0, 10, (3000,), generator=generator)
    classifier = train_linear_on_features(features[:2000], labels[:2000], 10, epochs=20)
    held_out = evaluate_classifier(classifier, features[2000:], labels[2000:])
    assert abs(held_out["top1"] - 10.0) < 4.0, held_out  # chance is 10%; sd ~0.95% at 1000 samples
    assert abs(held_out["top5"] - 50.0) < 7.0, held_out
    learnable = (
        features[:, 0].gt(0).long() + 2 * features[:, 1].gt(0).long()
    )  # linearly separable, 4 classes
    classifier = train_linear_on_features(features[:2000], learnable[:2000], 4, epochs=20)
    assert evaluate_classifier(classifier, features[2000:], learnable[2000:])["top1"] > 95.0


def test_subset_is_class_balanced_seeded_and_saved(tmp_path):
    rng = np.random.default_rng(0)
    labels = {
        f"k{i:05d}": int(label)
        for i, label in enumerate(rng.choice(10, 5000, p=[0.19] + [0.09] * 9))
    }  # imbalanced
    subset = select_subset(labels, 0.01, seed=3, num_classes=10)
    assert subset.per_class == 5 and all(len(keys) == 5 for keys in subset.keys_per_class.values())
    assert all(
        labels[key] == label for label, keys in subset.keys_per_class.items() for key in keys
    )
    assert len(set(subset.keys)) == 50
    assert (
        select_subset(labels, 0.01, seed=3, num_classes=10).keys_per_class == subset.keys_per_class
    )
    assert (
        select_subset(labels, 0.01, seed=4, num_classes=10).keys_per_class != subset.keys_per_class
    )
    subset.save(tmp_path / "s.json")
    assert LabelSubset.load(tmp_path / "s.json").keys_per_class == subset.keys_per_class
    assert select_subset(labels, 0.1, seed=3, num_classes=10).per_class == 50


def test_subset_from_shards_identical_across_runs_and_read_back(data, tmp_path):
    first, how = subset_for(data[0], 0.1, seed=0, subset_file=str(tmp_path / "a.json"))
    assert (
        how == "selected" and first.per_class == 3 and len(first.keys_per_class) == 4
    )  # 2.5 rounds up
    second, _ = subset_for(data[0], 0.1, seed=0, subset_file=str(tmp_path / "b.json"))
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    other, _ = subset_for(data[0], 0.1, seed=1)
    assert other.keys_per_class != first.keys_per_class
    again, how = subset_for(
        data[0], 0.5, seed=7, subset_file=str(tmp_path / "a.json")
    )  # the file wins
    assert how == "loaded" and again.keys_per_class == first.keys_per_class


def test_too_small_label_fraction_names_the_class():
    labels = {f"k{i}": i % 4 for i in range(40)} | {"extra": 0}
    with pytest.raises(SubsetError, match=r"0\.26 samples per class: less than 1 \(class \d"):
        select_subset(labels, 0.025, seed=0, num_classes=4)
    with pytest.raises(SubsetError, match="class 3 \\('ring'\\) has 0 training samples"):
        select_subset(
            {k: v for k, v in labels.items() if v != 3},
            0.5,
            seed=0,
            num_classes=4,
            class_names=CLASSES,
        )


def test_labelled_loader_reads_exactly_the_subset(data):
    subset, _ = subset_for(data[0], 0.2, seed=0)  # 5 per class, 20 in all
    loader = DaliLoader(
        data[0], 64, AugmentedView(classifier_augment(32)), train=True, keys=subset.keys, seed=0
    )
    assert (
        loader.num_samples == 20 and loader.batch_size == 20 and len(loader) == 1
    )  # the batch shrinks to the subset
    for _ in range(2):  # every epoch: the subset's samples, once each, re-augmented
        ((images, labels),) = list(loader)
        assert images.shape == (20, 3, 32, 32) and sorted(labels.tolist()) == sorted(
            [0, 1, 2, 3] * 5
        )
    with pytest.raises(ShardError, match="requested keys are not in"):
        DaliLoader(data[0], 4, AugmentedView(classifier_augment(32)), train=True, keys=["nope"])


# --------------------------------------------------------------------------- end to end


def test_knn_and_fast_linear_report(data, exported, tmp_path, capsys):
    report_path = tmp_path / "r.json"
    status, output = run_main(
        [
            "--checkpoint",
            exported,
            "--protocol",
            "all",
            "--epochs",
            5,
            "--json",
            report_path,
            *shard_args(data),
        ],
        capsys,
    )
    assert status == 0, output
    report = json.loads(report_path.read_text())
    metrics = report["results"][0]["metrics"]
    assert set(metrics) == {"knn200_top1", "knn200_top5", "linear_top1", "linear_top5"}
    assert all(0 <= v <= 100 for v in metrics.values())
    assert (
        report["protocols"] == ["knn", "linear"] and report["settings"]["linear"]["mode"] == "fast"
    )
    assert report["checkpoint"]["sha256"] == hashlib.sha256(exported.read_bytes()).hexdigest()
    assert (
        report["data"]["num_train"] == 100
        and report["data"]["num_val"] == 43
        and report["data"]["num_classes"] == 4
    )
    assert len(report["data"]["train_shards"]) == 3
    assert (
        {"torch", "timm", "dali"} <= set(report["versions"])
        and report["seed"] == 0
        and report["seconds"] > 0
    )


def test_augmented_linear_and_finetune_report(data, exported, tmp_path, capsys):
    report_path, subset_file = tmp_path / "r.json", tmp_path / "subset.json"
    status, output = run_main(
        [
            "--checkpoint",
            exported,
            "--protocol",
            "linear,finetune",
            "--augment",
            "true",
            "--epochs",
            2,
            "--finetune_epochs",
            1,
            "--label_fraction",
            0.1,
            "--subset_file",
            subset_file,
            "--seed",
            5,
            "--json",
            report_path,
            *shard_args(data),
        ],
        capsys,
    )
    assert status == 0, output
    report = json.loads(report_path.read_text())
    metrics = report["results"][0]["metrics"]
    assert set(metrics) == {"linear_top1", "linear_top5", "finetune_top1", "finetune_top5"}
    assert all(0 <= v <= 100 for v in metrics.values())
    linear, tune = report["settings"]["linear"], report["settings"]["finetune"]
    assert linear["mode"] == "augment" and linear["epochs"] == 2 and linear["global_batch"] == 16
    assert (
        tune["label_fraction"] == 0.1
        and tune["subset_file"] == str(subset_file)
        and tune["num_samples"] == 12
        and tune["per_class"] == 3
    )
    assert tune["subset"] == "selected" and report["seed"] == 5
    saved = json.loads(subset_file.read_text())
    assert saved["seed"] == 5 and sorted(map(len, saved["classes"].values())) == [3, 3, 3, 3]


@pytest.mark.slow
def test_two_processes_match_one_process(data, exported, tmp_path):
    """kNN and the fast linear probe on features gathered from 2 gloo ranks (22 + 21 val samples) equal
    one process's exactly: no validation sample duplicated or dropped. Fine-tuning runs under DDP too
    (its numbers differ: each rank augments its own half of the batch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    args = [
        "evaluate.py",
        "--checkpoint",
        str(exported),
        "--protocol",
        "knn,linear,finetune",
        "--epochs",
        "5",
        "--train_shards",
        str(data[0]),
        "--val_shards",
        str(data[1]),
        "--local_batch_size",
        "8",
        "--label_fraction",
        "0.2",
        "--finetune_epochs",
        "1",
    ]
    one = subprocess.run(
        [sys.executable, *args, "--json", str(tmp_path / "one.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *args,
            "--json",
            str(tmp_path / "two.json"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    one, two = (
        json.loads((tmp_path / "one.json").read_text()),
        json.loads((tmp_path / "two.json").read_text()),
    )
    assert one["processes"] == 1 and two["processes"] == 2
    assert (
        two["data"]["num_val"] == one["data"]["num_val"] == 43
        and two["data"]["num_train"] == one["data"]["num_train"] == 100
    )
    quick = lambda report: {
        k: v for k, v in report["results"][0]["metrics"].items() if not k.startswith("finetune")
    }
    assert quick(two) == quick(one) and len(quick(one)) == 4
    assert 0 <= two["results"][0]["metrics"]["finetune_top1"] <= 100
    assert (
        two["settings"]["finetune"]["global_batch"] == 16
        and two["settings"]["finetune"]["num_samples"] == 20
    )


# --------------------------------------------------------------------------- bad input


def test_checkpoint_of_another_architecture_is_named(data, exported, capsys):
    status, output = run_main(
        ["--model", "resnet50", "--weights", exported, "--protocol", "knn", *shard_args(data)],
        capsys,
    )
    assert status == 2 and "Traceback" not in output
    assert (
        str(exported) in output
        and "does not fit a resnet50" in output
        and "layer1.0.conv1.weight" in output
    ), output


def test_shards_without_labels_are_named(data, exported, tmp_path, capsys):
    (tmp_path / "nolabels").mkdir()
    tar = tmp_path / "nolabels" / "u-000000.tar"
    with wds.TarWriter(str(tar)) as writer:
        for i, image in enumerate(random_images(6)):
            writer.write({"__key__": f"u{i:03d}", "jpg": encode_jpeg(image)})
    write_index(tar)
    status, output = run_main(
        [
            "--checkpoint",
            exported,
            "--train_shards",
            data[0],
            "--val_shards",
            tar.parent,
            "--protocol",
            "knn",
        ],
        capsys,
    )
    assert status == 2 and str(tar) in output and "no label" in output, output
    status, output = run_main(
        [
            "--checkpoint",
            exported,
            "--train_shards",
            tar.parent,
            "--val_shards",
            data[1],
            "--protocol",
            "finetune",
        ],
        capsys,
    )
    assert status == 2 and str(tar) in output, output


def test_too_few_samples_per_class_is_named(data, exported, capsys):
    status, output = run_main(
        [
            "--checkpoint",
            exported,
            "--protocol",
            "finetune",
            "--label_fraction",
            0.01,
            *shard_args(data),
        ],
        capsys,
    )
    assert status == 2 and "less than 1 (class" in output and "'disc'" in output, output


def test_missing_backbone_file(data, tmp_path, capsys):
    status, output = run_main(
        ["--checkpoint", tmp_path / "nothing.safetensors", "--protocol", "knn", *shard_args(data)],
        capsys,
    )
    assert status == 2 and "nothing.safetensors" in output


# --------------------------------------------------------------------------- the command line


def test_flags_config_file_and_print_config_agree(tmp_path):
    """evaluate.py's fields come from one typed config (as train.py's): a YAML --config and the flags give the same
    configuration, flags after the file override it, booleans are written `true`, --k takes a comma list."""
    from simclr_dali.evaluation.config import UsageError, parse_args

    flags = [
        "--train_shards",
        "t",
        "--val_shards",
        "v",
        "--protocol",
        "all",
        "--k",
        "10,20,200",
        "--augment",
        "true",
    ]
    from_flags = parse_args(flags)
    assert (
        from_flags.k == [10, 20, 200]
        and from_flags.augment is True
        and from_flags.protocols() == ["knn", "linear"]
    )
    config = tmp_path / "eval.yaml"
    config.write_text(
        "train_shards: t\nval_shards: v\nprotocol: all\nk: [10, 20, 200]\naugment: true\nseed: 3\n"
    )
    assert parse_args(["--config", str(config), "--seed", "0"]) == from_flags
    assert parse_args(["--config", str(config)]).seed == 3
    for bad, named in [
        (["--augment"], "--augment"),  # one boolean style: a value is required
        (["--k", "10,0"], "--k must be integers >= 1"),
        (["--protocol", "knn,svm"], "--protocol: unknown protocol(s) ['svm']"),
        (["--precision", "fp8"], "precision"),
        (["--val_shards", ""], "--val_shards is required"),
    ]:
        with pytest.raises(UsageError, match=re.escape(named)):
            parse_args([*flags, *bad])


@pytest.mark.parametrize(
    "script, shards, missing",
    [
        ("evaluate.py", ["--train_shards", "t", "--val_shards", "v"], ["--train_shards", "t"]),
        (
            "train.py",
            ["--config", "configs/demo.yaml"],
            ["--config", "configs/demo.yaml", "--batch_size", "x"],
        ),
    ],
)
def test_help_and_print_config_answer_without_torch(script, shards, missing):
    """evaluate.py and train.py parse before their heavy imports: --help, --print_config and a bad flag answer
    without importing torch (the seconds they take are measured in README, not asserted here)."""
    probe = (
        f"import runpy, sys; sys.argv = [{script!r}, *sys.argv[1:]]\n"
        f"try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
        "except SystemExit as done:\n    print('torch' in sys.modules, done.code)\n"
    )
    for flags, status in (["--help"], 0), ([*shards, "--print_config"], 0), (missing, 2):
        done = subprocess.run(
            [sys.executable, "-c", probe, *flags],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.stdout.strip().splitlines()[-1] == f"False {status}", (
            done.stdout[-2000:] + done.stderr[-2000:]
        )

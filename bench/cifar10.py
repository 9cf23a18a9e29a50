"""`bench.py cifar10`: the CIFAR-10 recipe end to end with an accuracy-versus-time curve.

1. Shards, written once: from ../shared/data/cifar10/{train,test} (32x32 JPEG class folders) if present,
   else from the official python tarball given with ``--tarball`` (cifar-10-python.tar.gz).
2. Pretraining with a preset (default configs/cifar10_cpu.yaml on a CPU, configs/cifar10.yaml on a GPU),
   through train.py itself, evaluating kNN (k=200) and a fast linear probe on the official test split
   every ``eval_every_epochs`` (and at step 0: the same backbone at random initialisation).
3. The same run fed by the torchvision DataLoader baseline (``--data_loader torchvision``) for the same
   training wall-clock (``--max_train_minutes``), unless ``--no-baseline``: the pipeline's effect on
   time-to-accuracy.
4. bench/results/cifar10_<device>.json (both curves, device, versions, command, date) and a plot of
   accuracy against training wall-clock and epochs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from ..common.cli import ArgumentParser
from .common import RESULTS, ROOT, device_tag, write_result

SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


def write_shards(out: Path, tarball: str | None) -> str:
    """Train/test shards under ``out`` (skipped when already there); returns a description of the source."""
    if (out / "train" / "classes.json").exists() and (out / "test" / "classes.json").exists():
        return f"existing shards in {out}"
    for split in ("train", "test"):
        if SHARED_CIFAR.is_dir():
            command = [
                "write",
                "folder",
                str(SHARED_CIFAR / split),
                str(out / split / f"{split}-%06d.tar"),
            ]
        elif tarball:
            command = [
                "write",
                "cifar",
                tarball,
                str(out / split / f"{split}-%06d.tar"),
                "--split",
                split,
            ]
        else:
            raise SystemExit(
                "no CIFAR-10 source: ../shared/data/cifar10 is absent; download cifar-10-python.tar.gz "
                "(https://www.cs.toronto.edu/~kriz/cifar.html) and pass --tarball PATH"
            )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "simclr_dali.pipeline.shards.cli",
                *command,
                "--max_count",
                "10000",
            ],
            cwd=ROOT,
            check=True,
        )
    return (
        "../shared/data/cifar10 (CIFAR-10 re-encoded as 32x32 JPEG, see its README)"
        if SHARED_CIFAR.is_dir()
        else f"official python tarball {tarball}"
    )


def train_command(config: Path, shards: Path, output_dir: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "--config",
        str(config),
        "--train_shards",
        str(shards / "train"),
        "--eval_train_shards",
        str(shards / "train"),
        "--eval_val_shards",
        str(shards / "test"),
        "--output_dir",
        str(output_dir),
        "--eval_json",
        str(output_dir / "eval_curve.json"),
        *extra,
    ]


def pretrain(
    config: Path, shards: Path, output_dir: Path, extra: list[str], run: bool = True
) -> dict:
    """Run train.py (``run=False``: read the curve an earlier identical run left) -> {command, config, history}."""
    command = train_command(config, shards, output_dir, extra)
    if run:
        print("$", " ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
    return {
        "command": " ".join(command[1:]),
        **json.loads((output_dir / "eval_curve.json").read_text()),
    }


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, run in curves.items():
        history = run["history"]
        minutes = [h["train_seconds"] / 60 for h in history]
        epochs = [h["epoch"] for h in history]
        for axis, x in zip(axes, (minutes, epochs)):
            axis.plot(x, [h["knn_top1"] for h in history], marker="o", label=f"{label}: kNN top-1")
            axis.plot(
                x,
                [h["linear_top1"] for h in history],
                marker=".",
                linestyle="--",
                label=f"{label}: linear top-1",
            )
    axes[0].set_xlabel("training wall-clock (minutes, evaluation excluded)")
    axes[1].set_xlabel("epochs")
    for axis in axes:
        axis.set_ylabel("CIFAR-10 test accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main(argv=None) -> dict:
    on_gpu = torch.cuda.is_available()
    parser = ArgumentParser(prog="bench.py cifar10", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default=str(ROOT / "configs" / ("cifar10.yaml" if on_gpu else "cifar10_cpu.yaml")),
    )
    parser.add_argument("--shards", default=str(ROOT / "data" / "cifar10"))
    parser.add_argument(
        "--tarball",
        default=None,
        help="cifar-10-python.tar.gz, when ../shared/data/cifar10 is absent",
    )
    parser.add_argument("--output", default=str(ROOT / "runs" / f"cifar10_{device_tag()}"))
    parser.add_argument("--no_baseline", action="store_true", help="skip the torchvision-fed run")
    parser.add_argument(
        "--train_args", default="", help="extra train.py flags for both runs, e.g. '--epochs 2'"
    )
    parser.add_argument(
        "--baseline_only",
        action="store_true",
        help="reuse the DALI run's curve in OUTPUT/dali, run the baseline only",
    )
    args = parser.parse_args(argv)
    shards, output = Path(args.shards), Path(args.output)
    source = write_shards(shards, args.tarball)
    extra = args.train_args.split()
    curves = {
        "DALI": pretrain(
            Path(args.config), shards, output / "dali", extra, run=not args.baseline_only
        )
    }
    if (
        not args.no_baseline
    ):  # the same training time as the DALI run (its schedule, cut where that time runs out)
        budget = curves["DALI"]["history"][-1]["train_seconds"] / 60
        curves["torchvision DataLoader"] = pretrain(
            Path(args.config),
            shards,
            output / "torchvision",
            [*extra, "--data_loader", "torchvision", "--max_train_minutes", f"{budget:.2f}"],
        )
    config = curves["DALI"]["config"]
    title = (
        f"SimCLR {config['backbone']} "
        f"{json.dumps(config['timm_kwargs']) if config['timm_kwargs'] else ''} on CIFAR-10, "
        f"batch {config['batch_size']}, {device_tag()}"
    )
    plot_path = RESULTS / f"cifar10_{device_tag()}.png"
    plot(curves, plot_path, title)
    summary = {}
    for label, run in curves.items():
        history = run["history"]
        summary[label] = {
            "random_init_knn_top1": history[0]["knn_top1"],
            "final_knn_top1": history[-1]["knn_top1"],
            "final_linear_top1": history[-1]["linear_top1"],
            "train_minutes": round(history[-1]["train_seconds"] / 60, 1),
            "epochs": round(history[-1]["epoch"], 2),
        }
        print(
            f"{label}: kNN {summary[label]['random_init_knn_top1']:.1f}% (random init) -> "
            f"{summary[label]['final_knn_top1']:.1f}% after {summary[label]['train_minutes']} min / "
            f"{summary[label]['epochs']} epochs; linear {summary[label]['final_linear_top1']:.1f}%"
        )
    path = write_result(
        "cifar10",
        {
            "data": source,
            "config_file": args.config,
            "summary": summary,
            "curves": curves,
            "plot": str(plot_path.relative_to(ROOT)),
        },
    )
    print(f"wrote {path} and {plot_path}")
    return summary


if __name__ == "__main__":
    main()

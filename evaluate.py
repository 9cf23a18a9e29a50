"""Evaluate a backbone with the paper's protocols on labelled WebDataset shards.

    python evaluate.py --checkpoint runs/demo --train_shards data/demo/train --val_shards data/demo/val --protocol knn
    python evaluate.py --checkpoint runs/demo/backbone.safetensors ... --protocol linear --augment
    python evaluate.py --model resnet50 --weights supervised.safetensors ... --protocol linear
    python evaluate.py --checkpoint runs/imagenet ... --protocol finetune --subset_list 1percent.txt
    accelerate launch --num_processes 8 evaluate.py --checkpoint runs/imagenet ... --protocol knn,linear --k 10,20,200

Protocols (a comma list; 'all' = knn,linear, the quick pair the demo runs):
  knn       weighted k-NN (k=200, T=0.1; several k in one pass: --k 10,20,200) on L2-normalised frozen
            features of the centre crop.
  linear    linear classifier on the frozen backbone. Fast mode (default): features of the centre crop
            extracted once and cached on the device, --epochs (100) epochs over them. --augment: the
            paper's mode, a random resized crop + flip every epoch, backbone in eval mode, --epochs (90).
  finetune  the whole backbone + a linear head on a class-balanced --label_fraction subset of the
            training shards (chosen with --seed, saved to / read from --subset_file), --finetune_epochs
            (60 for <= 1% labels, 30 above), BN in train mode.
  distill   SimCLRv2's self-distillation (with finetune: --protocol finetune,distill): a fresh student of the
            same architecture learns the fine-tuned teacher's softened predictions (--distill_temperature 1)
            on unlabelled --distill_shards (default the training shards, labels unused), --distill_epochs.
--ft_proj_selector J evaluates the backbone followed by the first J layers of the pretrained projection head
(SimCLRv2 fine-tunes from J = 1 of its 3-layer head; 0 = the backbone alone).
Training protocols use SGD with Nesterov momentum 0.9, a cosine schedule and no weight decay, at
lr = base lr x global batch / 256 (base 0.1 linear, 0.05 fine-tuning). All report top-1 and top-5 on the
whole validation set. Prints a summary; --json writes a report. Bad input exits with status 2.
Every field of evaluation/config.py:EvalConfig is a flag (--help lists them); --config FILE reads them from
YAML, --print_config prints them; booleans are written --augment true. Flags are spelled with underscores
(--train_shards); the dashed spelling (--train-shards) works too.
"""

from __future__ import annotations

import sys
from typing import Any

# ruff: noqa: E402 (the imports below come after the early parse on purpose)
# `duplicates` pair kept (shape only): the same prologue as train.py's (script -> module, then the early parse).
# It runs before any relative import can (a script has no package), so no shared helper can hold it.
if (
    __name__ == "__main__" and not __package__
):  # `python evaluate.py` runs this file as the package's module
    import runpy

    runpy.run_module("simclr_dali.evaluate", run_name="__main__", alter_sys=True)
    sys.exit(0)

if (
    __name__ == "__main__"
):  # --help, --print_config and usage errors answer before torch and DALI are imported
    from .common.errors import SimclrError
    from .evaluation.config import parse_args

    try:
        parse_args(None, __doc__)
    except SimclrError as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        sys.exit(error.exit_status)

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import accelerate
import timm
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from .common.errors import ExitStatus, SimclrError
from .common.files import WriteFailure, check_writable, write_result
from .evaluation.backbone import load_backbone
from .evaluation.config import EvalConfig, UsageError, parse_args
from .evaluation.distill import agreement, distill
from .evaluation.features import cached_features, extract_features
from .evaluation.finetune import Classifier, finetune
from .evaluation.head_layers import with_head_layers
from .evaluation.knn import knn_predict, topk_accuracy
from .evaluation.linear import evaluate_classifier, train_linear_augmented, train_linear_on_features
from .evaluation.subset import LabelSubset, SubsetError, subset_for
from .pipeline.loader import (
    AugmentedView,
    DaliLoader,
    EvalView,
    UnlabelledView,
    classifier_augment,
    default_num_threads,
)
from .pipeline.shards.location import count_classes
from .pipeline.shards.shardset import ShardError

__all__ = ["EvalConfig", "UsageError", "main", "parse_args"]


def choose_subset(args, accelerator, num_classes: int | None) -> tuple[LabelSubset, str]:
    """The main process reads the labels and selects (or loads) the subset; the others receive it."""
    payload: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            subset, how = subset_for(
                args.train_shards,
                args.label_fraction or 0.01,
                args.seed,
                args.subset_file,
                num_classes,
                args.subset_list,
            )
            payload = [{"subset": subset.to_json(), "how": how}]
        except (SubsetError, ShardError) as error:
            payload = [{"error": str(error), "type": type(error).__name__}]
    if accelerator.num_processes > 1:
        broadcast_object_list(payload)
    if "error" in payload[0]:
        raise (ShardError if payload[0]["type"] == "ShardError" else SubsetError)(
            payload[0]["error"]
        )
    return LabelSubset.from_json(payload[0]["subset"]), payload[0]["how"]


def evaluate_backbone(
    backbone, info: dict, data: dict, protocols: list[str], accelerator, args, num_classes: int
) -> tuple[dict, dict]:
    """({'knn200_top1': %, 'knn200_top5', 'linear_top1', ..., 'finetune_top5'}, seconds per protocol)."""
    metrics, seconds, cache = {}, {}, {}

    def features(name):
        if name not in cache:
            identity = {
                "weights": info["sha256"] or info["source"],
                "model": info["model_name"],
                "head_layers": info.get("ft_proj_selector", 0),
                "shards": [str(p) for p in data[name].shards],
                "view": repr(data[name].view),
                "processes": accelerator.num_processes,
            }
            path = (
                Path(args.features_cache)
                / f"{name}-{(info['sha256'] or info['source'])[:16]}-j{info.get('ft_proj_selector', 0)}.safetensors"
                if args.features_cache
                else None
            )
            cache[name] = cached_features(
                backbone, data[name], accelerator, f"{name} features", path, identity
            )
        return cache[name]

    if "knn" in protocols:
        started = time.time()
        (train_features, train_labels), (val_features, val_labels) = (
            features("train"),
            features("val"),
        )
        scores = knn_predict(
            train_features, train_labels, val_features, num_classes, args.k, args.knn_temperature
        )
        for k in args.k:
            metrics.update(
                {f"knn{k}_{top}": v for top, v in topk_accuracy(scores[k], val_labels).items()}
            )
        seconds["knn"] = time.time() - started
    if "linear" in protocols:
        started = time.time()
        set_seed(args.seed)
        if args.augment:
            head = train_linear_augmented(
                backbone,
                data["train_augmented"],
                num_classes,
                accelerator,
                epochs=args.epochs,
                lr=args.lr,
            )
            val_features, val_labels = features("val")
            result = evaluate_classifier(head, val_features, val_labels)
        else:
            (train_features, train_labels), (val_features, val_labels) = (
                features("train"),
                features("val"),
            )
            # `duplicates` pair kept (shape only): keyword arguments shaped like simclr-shards' write_source call
            classifier = train_linear_on_features(
                train_features,
                train_labels,
                num_classes,
                epochs=args.epochs,
                lr=args.lr,
                seed=args.seed,
                progress=accelerator.is_main_process,
            )
            result = evaluate_classifier(classifier, val_features, val_labels)
        metrics.update({f"linear_{k}": v for k, v in result.items()})
        seconds["linear"] = time.time() - started
    if "finetune" in protocols:
        started = time.time()
        set_seed(args.seed)
        classifier = finetune(
            backbone,
            data["train_subset"],
            num_classes,
            accelerator,
            epochs=args.finetune_epochs,
            lr=args.finetune_lr,
        )
        logits, val_labels = extract_features(
            classifier, data["val"], accelerator, "val (fine-tuned)"
        )
        metrics.update({f"finetune_{k}": v for k, v in topk_accuracy(logits, val_labels).items()})
        seconds["finetune"] = time.time() - started
    if "distill" in protocols:
        started = time.time()
        metrics.update(distill_protocol(classifier, data, accelerator, args, num_classes))
        seconds["distill"] = time.time() - started
    return metrics, {k: round(v, 2) for k, v in seconds.items()}


def distill_protocol(teacher, data: dict, accelerator, args, num_classes: int) -> dict:
    """SimCLRv2's step 3: a student of the teacher's architecture, randomly initialised (``args.student``: the
    backbone at random init, with the same kept head layers), distilled on ``data['distill']``; its top-1/5 on the
    val set, and its agreement with the teacher on the val set before and after (the student matches it better)."""
    set_seed(args.seed)
    student = Classifier(args.student, num_classes).to(accelerator.device)
    torch.nn.init.normal_(
        student.fc.weight, std=0.01
    )  # a zero head would agree with nothing at the start
    before = agreement(student, teacher, data["val"], accelerator)
    student, losses = distill(
        teacher,
        student,
        data["distill"],
        accelerator,
        epochs=args.distill_epochs,
        lr=args.distill_lr,
        temperature=args.distill_temperature,
        progress=accelerator.is_main_process,
    )
    logits, val_labels = extract_features(student, data["val"], accelerator, "val (distilled)")
    after = agreement(student, teacher, data["val"], accelerator)
    accelerator.print(
        f"distill: loss per epoch {[round(x, 4) for x in losses]}; agreement {before:.1f}% -> {after:.1f}%"
    )
    return {
        **{f"distill_{k}": v for k, v in topk_accuracy(logits, val_labels).items()},
        "distill_agreement_start": before,
        "distill_agreement_end": after,
        "distill_loss_first_epoch": losses[0],
        "distill_loss_last_epoch": losses[-1],
    }


def versions() -> dict:
    import nvidia.dali

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "dali": nvidia.dali.__version__,
        "accelerate": accelerate.__version__,
    }


def build_loaders(
    args, accelerator, size: int, protocols: list[str]
) -> tuple[dict, int, LabelSubset | None, str | None]:
    """The loaders the protocols read (train/val features, the augmented train set, the label subset),
    the number of classes, and the fine-tuning subset with how it was obtained."""
    where = "gpu" if accelerator.device.type == "cuda" else "cpu"
    common = dict(
        device=where,
        device_id=accelerator.device.index if where == "gpu" else None,
        shard_id=accelerator.process_index,
        num_shards=accelerator.num_processes,
        num_threads=default_num_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), where),
    )
    view = EvalView(size, args.resize)
    data = {
        "train": DaliLoader(args.train_shards, args.local_batch_size, view, train=False, **common),
        "val": DaliLoader(args.val_shards, args.local_batch_size, view, train=False, **common),
    }
    num_classes = count_classes(data["train"].shards, data["val"].shards)
    augmented = AugmentedView(classifier_augment(size, (args.min_crop_area, 1.0)))

    def training(view, shards=args.train_shards, **extra) -> DaliLoader:  # shuffled, augmented
        return DaliLoader(
            shards, args.local_batch_size, view, train=True, seed=args.seed, **common, **extra
        )

    if "linear" in protocols and args.augment:
        data["train_augmented"] = training(augmented)
    subset, subset_how = None, None
    if "finetune" in protocols:
        subset, subset_how = choose_subset(args, accelerator, num_classes)
        if (
            args.label_fraction is not None
            and abs(args.label_fraction - subset.label_fraction) > 1e-12
        ):
            accelerator.print(
                f"note: {subset.list_file or args.subset_file} holds a {subset.label_fraction:g} subset "
                f"(seed {subset.seed}); "
                f"--label_fraction {args.label_fraction:g} is not used"
            )
        data["train_subset"] = training(augmented, keys=subset.keys)
    if "distill" in protocols:  # issue 31: unlabelled images, the fine-tuning augmentation
        data["distill"] = training(
            UnlabelledView(augmented.augment), args.distill_shards or args.train_shards
        )
    return data, num_classes, subset, subset_how


def protocol_settings(args, data: dict, subset, subset_how: str, processes: int) -> dict:
    """The settings every protocol runs with, for the report."""
    sgd = "SGD nesterov momentum 0.9, cosine, no weight decay"
    settings = {
        "knn": {"k": args.k, "temperature": args.knn_temperature},
        "linear": {
            "mode": "augment" if args.augment else "fast",
            "epochs": args.epochs,
            "base_lr": args.lr,
            "optimizer": sgd,
            "global_batch": data["train_augmented"].batch_size * processes
            if args.augment
            else 1024,
        },
    }
    if subset is not None:
        settings["finetune"] = {
            "label_fraction": subset.label_fraction,
            "subset_seed": subset.seed,
            "subset_file": args.subset_file,
            "subset_list": args.subset_list,
            "subset": subset_how,
            "per_class": subset.per_class,
            "num_samples": subset.num_samples,
            "epochs": args.finetune_epochs,
            "base_lr": args.finetune_lr,
            "optimizer": sgd,
            "global_batch": data["train_subset"].batch_size * processes,
        }
    if "distill" in data:
        settings["distill"] = {
            "shards": args.distill_shards or args.train_shards,
            "epochs": args.distill_epochs,
            "base_lr": args.distill_lr,
            "temperature": args.distill_temperature,
            "optimizer": sgd,
            "student": "the teacher's architecture (kept head layers included) at random initialisation",
            "global_batch": data["distill"].batch_size * processes,
        }
    return settings


def print_summary(report: dict, accelerator) -> None:
    """One row per backbone, one column per metric, then the data and the time."""
    num_classes = report["data"]["num_classes"]
    names = list(report["results"][0]["metrics"])
    accelerator.print(f"\n{'backbone':<40} " + " ".join(f"{k:>15}" for k in names))
    for result in report["results"]:
        accelerator.print(
            f"{result['backbone']['source'][-40:]:<40} "
            + " ".join(f"{result['metrics'][k]:>14.2f}%" for k in names)
        )
    accelerator.print(
        f"{report['data']['num_train']} train / {report['data']['num_val']} val samples, {num_classes} classes, "
        f"{accelerator.num_processes} process(es), {report['seconds']:.1f} s"
    )


def report_header(
    args,
    info: dict,
    protocols,
    settings: dict,
    data: dict,
    num_classes: int,
    size: int,
    processes: int,
):
    """The --json report before any result: protocols and their settings, the checkpoint, the data, the run."""
    return {
        "protocols": protocols,
        "settings": {p: settings[p] for p in protocols},
        "checkpoint": {
            "source": info["source"],
            "sha256": info["sha256"],
            "model_name": info["model_name"],
            "ft_proj_selector": args.ft_proj_selector,
        },
        "data": {
            "train_shards": [str(p) for p in data["train"].shards],
            "val_shards": [str(p) for p in data["val"].shards],
            "num_train": data["train"].num_samples,
            "num_val": data["val"].num_samples,
            "num_classes": num_classes,
            "image_size": size,
        },
        "processes": processes,
        "seed": args.seed,
        "precision": args.precision,
        "results": [],
    }


def main(argv=None) -> int:
    """CLI of evaluate.py: check every input, evaluate each backbone, print and write the report (exit status)."""
    try:
        args = parse_args(argv, __doc__)
    except SimclrError as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return error.exit_status
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.precision)
    started = time.time()

    def fail(message: str) -> int:
        if accelerator.is_main_process:
            print(f"error: {message}", file=sys.stderr, flush=True)
        return ExitStatus.BAD_INPUT

    # ---- what to evaluate, on what: every input is checked here, before any long work
    try:
        if args.json and accelerator.is_main_process:
            check_writable(Path(args.json).parent, "--json's directory")
        if args.features_cache:
            check_writable(args.features_cache, "--features_cache")
        protocols = args.protocols()
        backbone, info = load_backbone(
            args.checkpoint, args.model, args.weights, args.random_init, args.seed
        )
        backbone = with_head_layers(
            backbone, args.checkpoint, args.ft_proj_selector
        )  # SimCLRv2's kept head layers
        info["ft_proj_selector"] = args.ft_proj_selector
        if "distill" in protocols:  # the student: the same architecture at random initialisation
            student, _ = load_backbone(
                args.checkpoint, args.model, args.weights, True, args.seed + 1
            )
            args.student = with_head_layers(
                student, args.checkpoint, args.ft_proj_selector, random=True
            )
        size = args.image_size or info.get("image_size") or 224
        data, num_classes, subset, subset_how = build_loaders(args, accelerator, size, protocols)
    except (ValueError, OSError, SimclrError) as error:
        return fail(str(error))
    args.epochs = args.epochs or (90 if args.augment else 100)
    if subset is not None:
        args.finetune_epochs = args.finetune_epochs or (60 if subset.label_fraction <= 0.01 else 30)
    candidates = [(backbone, info)]
    if (
        args.compare_random_init
    ):  # the same architecture, the kept head layers included, at random init
        random_backbone, random_info = load_backbone(
            args.checkpoint, args.model, args.weights, True, args.seed
        )
        random_backbone = with_head_layers(
            random_backbone, args.checkpoint, args.ft_proj_selector, random=True
        )
        candidates.append(
            (random_backbone, {**random_info, "ft_proj_selector": args.ft_proj_selector})
        )

    settings = protocol_settings(args, data, subset, subset_how, accelerator.num_processes)
    report = report_header(
        args, info, protocols, settings, data, num_classes, size, accelerator.num_processes
    )

    # ---- evaluate each backbone
    try:
        for candidate, candidate_info in candidates:
            candidate = candidate.to(accelerator.device).to(memory_format=torch.channels_last)
            metrics, seconds = evaluate_backbone(
                candidate, candidate_info, data, protocols, accelerator, args, num_classes
            )
            report["results"].append(
                {"backbone": candidate_info, "metrics": metrics, "seconds": seconds}
            )
    except ShardError as error:  # bad data found while reading (e.g. an image that does not decode)
        return fail(str(error))
    report.update(
        seconds=round(time.time() - started, 2),
        versions=versions(),
        device=str(accelerator.device),
        command=[Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )

    print_summary(report, accelerator)
    if args.json and accelerator.is_main_process:
        try:
            write_result(args.json, json.dumps(report, indent=1) + "\n", "--json report")
        except WriteFailure as error:  # the scores are printed above: only the report is lost
            print(f"error: {error.strerror}", file=sys.stderr, flush=True)
            return ExitStatus.OTHER
    return ExitStatus.DONE


if __name__ == "__main__":
    sys.exit(main())

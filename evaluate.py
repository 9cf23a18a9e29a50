"""Evaluate a backbone with the paper's protocols on labelled WebDataset shards.

    python evaluate.py --checkpoint runs/demo --train-shards data/demo/train --val-shards data/demo/val --protocol knn
    python evaluate.py --model resnet50 --weights supervised.safetensors ... --protocol linear
    accelerate launch --num_processes 8 evaluate.py --checkpoint runs/imagenet ... --protocol knn

Protocols: knn (weighted k-NN on L2-normalised features), linear (linear probe on frozen features;
fast mode: features cached once with the centre crop). Prints a summary; --json writes a report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from evaluation.backbone import BackboneError, load_backbone
from evaluation.features import extract_features
from evaluation.knn import knn_predict, topk_accuracy
from evaluation.linear import evaluate_classifier, train_linear_on_features
from evaluation.probe import num_classes_of
from pipeline.loader import EvalLoader
from pipeline.shards import ShardError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="train.py output dir, checkpoint dir, or backbone.safetensors")
    parser.add_argument("--model", help="timm model name (with --weights, or alone for timm's init)")
    parser.add_argument("--weights", help="weights file for --model (.safetensors or torch state dict)")
    parser.add_argument("--random-init", "--random_init", action="store_true", help="same architecture, random weights (baseline)")
    parser.add_argument("--train-shards", "--train_shards", required=True)
    parser.add_argument("--val-shards", "--val_shards", required=True)
    parser.add_argument("--protocol", default="knn", help="knn, linear, or a comma list (knn,linear); 'all' = knn,linear")
    parser.add_argument("--compare-random-init", "--compare_random_init", action="store_true",
                        help="also evaluate the same architecture at random initialisation, side by side")
    parser.add_argument("--image-size", "--image_size", type=int, default=0, help="default: the checkpoint's training size (else 224)")
    parser.add_argument("--resize", type=int, default=0, help="shorter side before the centre crop (default size/0.875; = size at <= 64 px)")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=256, help="per process")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--knn-temperature", "--knn_temperature", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=100, help="linear probe epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the report here")
    return parser.parse_args(argv)


def evaluate_backbone(backbone, loaders, protocols, accelerator, args) -> dict:
    """{'knn_top1', 'knn_top5', 'linear_top1', ...} in percent for the requested protocols."""
    train_features, train_labels = extract_features(backbone, loaders[0], accelerator, "train features")
    val_features, val_labels = extract_features(backbone, loaders[1], accelerator, "val features")
    num_classes = max(num_classes_of(loaders[0], train_labels), int(val_labels.max()) + 1)
    metrics = {}
    if "knn" in protocols:
        scores = knn_predict(train_features, train_labels, val_features, num_classes, args.k, args.knn_temperature)
        metrics.update({f"knn_{k}": v for k, v in topk_accuracy(scores, val_labels).items()})
    if "linear" in protocols:
        classifier = train_linear_on_features(train_features, train_labels, num_classes, epochs=args.epochs, seed=args.seed)
        metrics.update({f"linear_{k}": v for k, v in evaluate_classifier(classifier, val_features, val_labels).items()})
    return {**metrics, "_num_train": len(train_labels), "_num_val": len(val_labels), "_num_classes": num_classes}


def main(argv=None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    started = time.time()
    try:
        backbone, info = load_backbone(args.checkpoint, args.model, args.weights, args.random_init, args.seed)
        size = args.image_size or info.get("image_size") or 224
        resize = args.resize or (size if size <= 64 else None)
        data_device = "gpu" if accelerator.device.type == "cuda" else "cpu"
        loaders = [EvalLoader(shards, args.batch_size, size, resize_size=resize, device=data_device,
                              device_id=accelerator.device.index if data_device == "gpu" else None,
                              shard_id=accelerator.process_index, num_shards=accelerator.num_processes)
                   for shards in (args.train_shards, args.val_shards)]
    except (BackboneError, ShardError) as error:
        accelerator.print(f"error: {error}")
        return 2
    protocols = ["knn", "linear"] if args.protocol == "all" else args.protocol.split(",")
    unknown = [p for p in protocols if p not in ("knn", "linear")]
    if unknown:
        accelerator.print(f"error: unknown protocol(s) {unknown}; choose from knn, linear, all")
        return 2
    candidates = [(backbone, info)]
    if args.compare_random_init:
        random_backbone, random_info = load_backbone(args.checkpoint, args.model, args.weights, True, args.seed)
        candidates.append((random_backbone, random_info))
    report = {"train_shards": args.train_shards, "val_shards": args.val_shards, "image_size": size, "processes": accelerator.num_processes, "results": []}
    for candidate, candidate_info in candidates:
        candidate = candidate.to(accelerator.device).to(memory_format=torch.channels_last)
        metrics = evaluate_backbone(candidate, loaders, protocols, accelerator, args)
        report["results"].append({"backbone": candidate_info, "metrics": metrics})
        report.update(num_train=metrics.pop("_num_train"), num_val=metrics.pop("_num_val"), num_classes=metrics.pop("_num_classes"))
    report["seconds"] = round(time.time() - started, 2)
    accelerator.print(f"\n{'backbone':<40} " + " ".join(f"{k:>12}" for k in report["results"][0]["metrics"]))
    for result in report["results"]:
        accelerator.print(f"{result['backbone']['source'][-40:]:<40} " + " ".join(f"{v:>11.2f}%" for v in result["metrics"].values()))
    if args.json and accelerator.is_main_process:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

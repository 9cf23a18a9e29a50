"""WebDataset shard tools: write, index and verify (the command line of ``pipeline.shardset`` and ``pipeline.sources``).

    python -m pipeline.shards write folder  IMAGE_ROOT OUT/train-{000000..999999}.tar
    python -m pipeline.shards write cifar   cifar-10-python.tar.gz OUT/train-%06d.tar --split train
    python -m pipeline.shards write arrays  data.npz OUT/train-%06d.tar
    python -m pipeline.shards write synthetic OUT/demo-train-%06d.tar --num_classes 10 --per_class 200
    python -m pipeline.shards index OUT/train-{000000..000012}.tar
    python -m pipeline.shards verify OUT/

Flags are spelled with underscores (``--max_count``); the dashed spelling (``--max-count``) works too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from common.cli import ArgumentParser

from .shardset import ShardError, brace_notation, index_shards, shard_paths, verify_shards, write_shards
from .sources import SHAPES, array_samples, cifar_samples, folder_samples, synthetic_images


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m pipeline.shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    write = commands.add_parser("write", help="write WebDataset shards (+ DALI indexes, classes.json) from images")
    sources = write.add_subparsers(dest="source", required=True)
    common = ArgumentParser(add_help=False)
    common.add_argument("--max_count", type=int, default=10_000, help="samples per shard (default 10000)")
    common.add_argument("--max_bytes", type=float, default=1e9, help="bytes per shard (default 1e9)")
    common.add_argument("--quality", type=int, default=95, help="JPEG quality when encoding raw pixels (default 95)")
    common.add_argument("--no_index", action="store_true", help="do not write DALI index files")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    out_help = "output shard names: printf (OUT/train-%%06d.tar) or brace (OUT/train-{000000..999999}.tar) pattern"
    folder = sources.add_parser("folder", parents=[common], help="from ROOT/CLASS/*.jpg (labels: sorted class-folder names)")
    folder.add_argument("root", type=Path)
    folder.add_argument("out", help=out_help)
    folder.add_argument("--on_error", choices=["stop", "skip"], default="stop",
                        help="bad inputs (truncated/non-image files, empty class folders): stop with an error (default) or skip and count")
    folder.add_argument("--seed", type=int, default=0, help="seed of the sample order shuffle (default 0)")
    folder.add_argument("--workers", type=int, default=None, help="processes reading and checking images (default: all cores)")
    cifar = sources.add_parser("cifar", parents=[common], help="from the official CIFAR-10/100 python tarball")
    cifar.add_argument("tarball", type=Path)
    cifar.add_argument("out", help=out_help)
    cifar.add_argument("--split", choices=["train", "test"], required=True)
    arrays = sources.add_parser("arrays", parents=[common], help="from a .npz with uint8 `images` (N,H,W[,3]) and int `labels` (N,)")
    arrays.add_argument("npz", type=Path)
    arrays.add_argument("out", help=out_help)
    arrays.add_argument("--classes", default=None, help="comma-separated class names (default: 0..K-1)")
    synthetic = sources.add_parser("synthetic", parents=[common], help="procedurally generated shapes/textures (the demo's data)")
    synthetic.add_argument("out", help=out_help)
    synthetic.add_argument("--num_classes", type=int, default=10)
    synthetic.add_argument("--per_class", type=int, default=200)
    synthetic.add_argument("--size", type=int, default=32)
    synthetic.add_argument("--seed", type=int, default=0)

    index = commands.add_parser("index", help="write DALI index files (NAME.idx beside each NAME.tar)")
    index.add_argument("shards", nargs="+", help="shard files, directories, globs or brace patterns")
    index.add_argument("--quiet", action="store_true")

    verify = commands.add_parser("verify", help="check that every sample decodes and has a label; lists bad shard/key pairs")
    verify.add_argument("shards", nargs="+", help="shard files, directories, globs or brace patterns")
    verify.add_argument("--no_labels", action="store_true", help="do not require .cls labels")
    verify.add_argument("--workers", type=int, default=None)
    verify.add_argument("--quiet", action="store_true")

    args = parser.parse_args(argv)
    try:
        if args.command == "write":
            options = dict(max_count=args.max_count, max_bytes=args.max_bytes, index=not args.no_index, progress=not args.quiet)
            if args.source == "folder":
                classes, total, samples, problems = folder_samples(args.root, seed=args.seed, workers=args.workers)
                report = write_shards(samples, args.out, classes, total, on_error=args.on_error, skipped=problems, **options)
            elif args.source == "cifar":
                classes, total, samples = cifar_samples(args.tarball, args.split, args.quality)
                report = write_shards(samples, args.out, classes, total, **options)
            elif args.source == "arrays":
                if not args.npz.is_file():
                    raise ShardError(f"array file {args.npz} does not exist")
                data = np.load(args.npz)
                if "images" not in data or "labels" not in data:
                    raise ShardError(f"{args.npz} must hold arrays named 'images' and 'labels' (has {list(data.keys())})")
                labels = data["labels"].astype(np.int64)
                classes = args.classes.split(",") if args.classes else [str(i) for i in range(int(labels.max()) + 1)]
                report = write_shards(array_samples(data["images"], labels, args.quality, str(args.npz)), args.out, classes, len(labels), **options)
            else:
                images, labels = synthetic_images(args.num_classes, args.per_class, args.size, args.seed)
                classes = list(SHAPES[: args.num_classes])
                report = write_shards(array_samples(images, labels, args.quality, "synthetic"), args.out, classes, len(labels), **options)
            print(f"wrote {report.written} samples to {len(report.shards)} shard(s): {brace_notation(report.shards)}")
            if report.skipped:
                print(f"skipped {len(report.skipped)} bad input(s):")
                for source, reason in report.skipped:
                    print(f"  {source}: {reason}")
        elif args.command == "index":
            shards = shard_paths(args.shards)
            index_shards(shards, progress=not args.quiet)
            print(f"indexed {len(shards)} shard(s): {brace_notation(shards)}")
        else:
            shards = shard_paths(args.shards)
            total, problems = verify_shards(shards, require_labels=not args.no_labels, progress=not args.quiet, workers=args.workers)
            for problem in problems:
                print(problem)
            print(f"verified {total} samples in {len(shards)} shard(s): {len(problems)} problem(s)")
            return 1 if problems else 0
    except ShardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

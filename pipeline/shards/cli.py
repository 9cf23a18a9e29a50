"""WebDataset shard tools: write, index and verify (the command line of the ``pipeline`` shard modules).

    simclr-shards write images  PHOTOS/ OUT/train-%06d.tar                # recursive, no labels
    simclr-shards write folder  IMAGE_ROOT/ OUT/train-{000000..999999}.tar  # ROOT/CLASS/*.jpg
    simclr-shards write list    val.csv OUT/val-%06d.tar --root VAL/ --classes OUT/classes.json
    simclr-shards write cifar   cifar-10-python.tar.gz OUT/train-%06d.tar --split train
    simclr-shards write arrays  data.npz OUT/train-%06d.tar
    simclr-shards write synthetic OUT/demo-train-%06d.tar --num_classes 10 --per_class 200
    simclr-shards index OUT/train-{000000..000012}.tar
    simclr-shards verify OUT/

Every sample keeps its source path (``KEY.json``) under a key derived from it; baseline JPEGs are stored
byte-identical, anything else PIL opens is re-encoded as a baseline JPEG. An interrupted ``write`` resumes
when run again with the same arguments. Flags are spelled with underscores (``--max_count``); the dashed
spelling (``--max-count``) works too.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ...common.cli import ArgumentParser
from ...common.errors import ExitStatus, SimclrError
from .image_policy import SUBSAMPLING_CHOICES, ImagePolicy
from .pixel_sources import arrays_source, cifar_source, synthetic_source
from .s3 import is_s3
from .s3_cli import index_remote, verify_remote, write_remote
from .shardset import (
    ShardError,
    brace_notation,
    index_shards,
    is_labelled,
    output_pattern,
    shard_paths,
)
from .source_writer import check_outside, writable_directory, write_source
from .sources import folder_source, images_source, list_source
from .verify import describe_set, verify_shards
from .writer import DEFAULT_MAX_BYTES, DEFAULT_MAX_COUNT

SHOWN_SKIPS = 20


class OneLineErrorParser(ArgumentParser):
    """Bad flags and values end with one line naming them and exit status 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def at_least(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


# Shard size: with DALI's shuffle buffer (4,096 samples by default) drawing from the shards a rank reads in
# turn, 1,000-sample shards put ~4 shards' samples in every buffer and change which ones every epoch (the
# shard order is reshuffled); ~10k-sample shards keep a batch's neighbours inside one shard, epoch after epoch.
MAX_COUNT_HELP = (
    f"samples per shard (default {DEFAULT_MAX_COUNT}: small enough that DALI's shuffle buffer mixes several "
    "shards, which change every epoch; ~110 MB per shard at ImageNet's image size)"
)


def build_parser() -> ArgumentParser:
    parser = OneLineErrorParser(
        prog="simclr-shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser(
        "write",
        help="write WebDataset shards (+ DALI indexes, classes.json, shardset.json) from images",
    )
    add_write_sources(write.add_subparsers(dest="source", required=True))
    index = commands.add_parser(
        "index", help="write DALI index files (NAME.idx beside each NAME.tar)"
    )
    index.add_argument(
        "shards", nargs="+", help="shard files, directories, globs or brace patterns"
    )
    index.add_argument("--quiet", action="store_true")
    verify = commands.add_parser(
        "verify",
        help="check every sample (decodes, label where the set is labelled), say how the set was written",
    )
    verify.add_argument(
        "shards", nargs="+", help="shard files, directories, globs or brace patterns"
    )
    verify.add_argument(
        "--no_labels", action="store_true", help="do not require .cls labels even in a labelled set"
    )
    verify.add_argument(
        "--workers", type=at_least(1), default=None, help="processes (default: all cores)"
    )
    verify.add_argument("--quiet", action="store_true")
    return parser


OUT_HELP = (
    "output shard names: printf (OUT/train-%%06d.tar) or brace (OUT/train-{000000..999999}.tar) pattern, "
    "one shard number"
)


def add_write_sources(sources) -> None:
    """``write images|folder|list|cifar|arrays|synthetic``: each source's own arguments after the shared ones."""
    common, pixels, seeded = write_options(), pixel_options(), seed_options()

    def source(name: str, summary: str, what: str, **what_options) -> ArgumentParser:
        """A file source: ``what`` (its input) and ``out``, after the shared options."""
        parser = sources.add_parser(name, parents=[common, seeded], help=summary)
        parser.add_argument(what, type=Path, **what_options)
        parser.add_argument("out", help=OUT_HELP)
        return parser

    source(
        "images",
        "every image under ROOT, recursively, without labels",
        "root",
        help="folder whose images (at any depth) are written; hidden files are left out",
    )
    source(
        "folder",
        "from ROOT/CLASS/... (labels: sorted class-folder names)",
        "root",
        help="folder of class folders: ROOT/CLASS/.../image",
    )
    listed = source(
        "list",
        "from a CSV/TSV of path[,label] rows (e.g. ImageNet's validation set)",
        "list_file",
        metavar="FILE.csv|FILE.tsv",
    )
    listed.add_argument(
        "--root",
        type=Path,
        default=None,
        help="folder the listed paths are relative to (default: the list's folder)",
    )
    listed.add_argument(
        "--classes",
        type=Path,
        default=None,
        help="class names in label order (a classes.json, e.g. the training set's, or one name per line): "
        "maps class-name labels to the same indices as another set",
    )
    add_pixel_sources(sources, [common, pixels])


def add_pixel_sources(sources, parents: list[ArgumentParser]) -> None:
    """``write cifar|arrays|synthetic``: the sources of raw pixels."""
    cifar = sources.add_parser(
        "cifar", parents=parents, help="from the official CIFAR-10/100 python tarball"
    )
    cifar.add_argument(
        "tarball", type=Path, help="cifar-10-python.tar.gz or cifar-100-python.tar.gz"
    )
    cifar.add_argument("out", help=OUT_HELP)
    cifar.add_argument("--split", choices=["train", "test"], required=True)
    arrays = sources.add_parser(
        "arrays",
        parents=parents,
        help="from a .npz with uint8 `images` (N,H,W[,3]) and optional int `labels` (N,)",
    )
    arrays.add_argument("npz", type=Path, help=".npz file with `images` (and `labels`)")
    arrays.add_argument("out", help=OUT_HELP)
    arrays.add_argument(
        "--classes", default=None, help="comma-separated class names (default: 0..K-1)"
    )
    synthetic = sources.add_parser(
        "synthetic", parents=parents, help="procedurally generated shapes (the demo's data)"
    )
    synthetic.add_argument("out", help=OUT_HELP)
    synthetic.add_argument("--num_classes", type=at_least(1), default=10)
    synthetic.add_argument("--per_class", type=at_least(1), default=200)
    synthetic.add_argument("--size", type=at_least(8), default=32)
    synthetic.add_argument("--seed", type=int, default=0)


def write_options() -> ArgumentParser:
    """The options every ``write`` source takes: shard size, image encoding, workers, error handling."""
    common = ArgumentParser(add_help=False)
    common.add_argument(
        "--max_count", type=at_least(1), default=DEFAULT_MAX_COUNT, help=MAX_COUNT_HELP
    )
    common.add_argument(
        "--max_bytes",
        type=positive_float,
        default=DEFAULT_MAX_BYTES,
        help="bytes per shard (default 1e9)",
    )
    common.add_argument(
        "--quality",
        type=at_least(1, 100),
        default=95,
        help="JPEG quality of re-encoded images (default 95)",
    )
    common.add_argument(
        "--subsampling",
        choices=list(SUBSAMPLING_CHOICES),
        default="auto",
        help="chroma subsampling of re-encoded images "
        "(default auto: a JPEG's own, 4:4:4 for other formats and raw pixels)",
    )
    size = common.add_mutually_exclusive_group()
    for flag, side in (("--max_side", "longer"), ("--shorter_side", "shorter")):
        size.add_argument(
            flag,
            type=at_least(1),
            default=None,
            help=f"shrink images whose {side} side exceeds N px (at write time)",
        )
    common.add_argument(
        "--workers",
        type=at_least(1),
        default=None,
        help="processes reading and encoding images (default: all cores)",
    )
    common.add_argument(
        "--window",
        type=at_least(1),
        default=None,
        help="images in flight between readers and the tar writer (bounds memory; default 32 per worker)",
    )
    common.add_argument(
        "--on_error",
        choices=["stop", "skip"],
        default="stop",
        help="bad inputs (corrupt/non-image files, empty class folders, missing listed files): stop with an error "
        "naming the first (default) or skip them and list them",
    )
    common.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards of a different (or finished) write in the output directory",
    )
    common.add_argument("--no_index", action="store_true", help="do not write DALI index files")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    return common


def pixel_options() -> ArgumentParser:
    """The option of the raw-pixel sources (CIFAR, arrays, synthetic): how pixels are stored."""
    pixels = ArgumentParser(add_help=False)
    pixels.add_argument(
        "--pixel_format",
        choices=["jpeg", "png"],
        default="jpeg",
        help="how raw pixels are stored: jpeg (default; 4:4:4 quality 95) or png (lossless, ~1.5x the bytes, "
        "decoded on the CPU): see README",
    )
    return pixels


def seed_options() -> ArgumentParser:
    """The option of the file sources (images, folder, list): the seed of their order shuffle."""
    seeded = ArgumentParser(add_help=False)
    seeded.add_argument(
        "--seed", type=int, default=0, help="seed of the sample order shuffle (default 0)"
    )
    return seeded


def make_source(args):
    if args.source == "images":
        return images_source(args.root, args.seed, progress=not args.quiet)
    if args.source == "folder":
        return folder_source(args.root, args.seed, progress=not args.quiet)
    if args.source == "list":
        return list_source(args.list_file, args.root, args.classes, args.seed)
    if args.source == "cifar":
        return cifar_source(args.tarball, args.split)
    if args.source == "arrays":
        return arrays_source(args.npz, args.classes.split(",") if args.classes else None)
    return synthetic_source(args.num_classes, args.per_class, args.size, args.seed)


def write(args) -> int:
    if is_s3(args.out):  # staged locally, then uploaded: pipeline.shards.s3_cli
        return write_remote(args, write)
    pattern = output_pattern(args.out)
    if args.source in ("images", "folder"):
        check_outside(Path(pattern).parent, args.root)
    writable_directory(Path(pattern).parent)  # before reading any input
    source = make_source(args)
    pixel_format = getattr(args, "pixel_format", "jpeg")
    try:
        policy = ImagePolicy(
            args.quality, args.subsampling, args.max_side, args.shorter_side, pixel_format
        )
    except ValueError as error:
        raise ShardError(str(error)) from None
    # `duplicates` pair kept (shape only): keyword arguments shaped like evaluate.py's linear-probe call
    report = write_source(
        source,
        pattern,
        policy,
        max_count=args.max_count,
        max_bytes=args.max_bytes,
        on_error=args.on_error,
        workers=args.workers or len(os.sched_getaffinity(0)),
        window=args.window,
        overwrite=args.overwrite,
        index=not args.no_index,
        progress=not args.quiet,
        shipper=getattr(args, "shipper", None),  # writing to a bucket: pipeline.shards.s3_cli
    )
    if report.finished_before:
        print(
            f"nothing to do: {Path(pattern).parent} already holds this write, complete ({report.written} samples in "
            f"{len(report.shards)} shard(s)); --overwrite rewrites it"
        )
        return 0
    kept = f" ({report.resumed_from} kept from an interrupted write)" if report.resumed_from else ""
    print(
        f"wrote {report.written} samples to {len(report.shards)} shard(s){kept}: {brace_notation(report.shards)}"
    )
    changes = ", ".join(f"{reason} {count}" for reason, count in report.changes.items())
    print(
        f"images: {report.copied} stored byte-identical, {report.written - report.copied} encoded ({changes or 'none'})"
    )
    if report.skipped:
        print(
            f"skipped {len(report.skipped)} bad input(s) (all listed in {Path(pattern).parent / 'shardset.json'}):"
        )
        for source_name, reason in report.skipped[:SHOWN_SKIPS]:
            print(f"  {source_name}: {reason}")
        if len(report.skipped) > SHOWN_SKIPS:
            print(f"  ... and {len(report.skipped) - SHOWN_SKIPS} more")
    return 0


def verify(args) -> int:
    if is_s3(args.shards):
        return verify_remote(",".join(args.shards), args.no_labels)
    shards = shard_paths(args.shards)
    description = describe_set(shards)
    for line in description:
        print(line)
    require_labels = not args.no_labels and is_labelled(shards)
    total, problems = verify_shards(
        shards, require_labels=require_labels, progress=not args.quiet, workers=args.workers
    )
    for problem in problems:
        print(problem)
    set_problems = sum(line.startswith("problem:") for line in description)
    print(
        f"verified {total} samples in {len(shards)} shard(s){'' if require_labels else ' (labels not required)'}: "
        f"{len(problems) + set_problems} problem(s)"
    )
    return ExitStatus.OTHER if problems or set_problems else ExitStatus.DONE  # 1: problems found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "write":
            return write(args)
        if args.command == "index" and is_s3(args.shards):
            return index_remote(",".join(args.shards))
        if args.command == "index":
            shards = shard_paths(args.shards)
            index_shards(shards, progress=not args.quiet)
            print(f"indexed {len(shards)} shard(s): {brace_notation(shards)}")
            return ExitStatus.DONE
        return verify(args)
    except SimclrError as error:  # one line, whatever a library's message held
        print(f"error: {' '.join(str(error).splitlines())}", file=sys.stderr)
        return error.exit_status


if __name__ == "__main__":
    sys.exit(main())

"""``simclr-export``'s command line, light on purpose (no torch): ``--help`` and bad flags answer before the
exporter (trainer/export.py) is imported. Flags are spelled as everywhere (``--output_dir``; ``--output-dir``
works too)."""

from __future__ import annotations

import argparse

from ..common.cli import ArgumentParser
from ..common.errors import SimclrError


class ExportUsageError(SimclrError, ValueError):
    """A bad simclr-export command line; the message names the flag."""


class _Parser(ArgumentParser):
    def error(
        self, message: str
    ):  # one line and status 2 (ExportUsageError), not argparse's usage block
        raise ExportUsageError(message)


def build_parser(description: str = "") -> ArgumentParser:
    parser = _Parser(
        prog="simclr-export", description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "checkpoint",
        help="a checkpoint directory (RUN/checkpoints/step_N) or a train.py output directory",
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where the export goes (default: RUN/exports/step_N beside the checkpoints)",
    )
    return parser


def parse_args(argv: list[str] | None = None, description: str = "") -> argparse.Namespace:
    """The export's arguments; ``--help`` prints and exits; ``ExportUsageError`` (one line) otherwise."""
    return build_parser(description).parse_args(argv)

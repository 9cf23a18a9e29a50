"""One flag spelling for every command line of the project: underscores (``--batch_size``), as the config
fields are named; the dashed spelling (``--batch-size``) is accepted as an alias everywhere."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def underscore_flags(argv: Sequence[str]) -> list[str]:
    """``--batch-size=4`` -> ``--batch_size=4``: long options with dashes spelled with underscores (values
    and positional arguments untouched; everything after a bare ``--`` is left as it is)."""
    out: list[str] = []
    for position, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[position:])
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        out.append(arg)
    return out


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that accepts the dashed spelling of every underscored long option (and
    no abbreviations: ``--max`` is not ``--max_count``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        import sys

        return super().parse_known_args(underscore_flags(sys.argv[1:] if args is None else args), namespace)

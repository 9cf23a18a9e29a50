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

        return super().parse_known_args(
            underscore_flags(sys.argv[1:] if args is None else args), namespace
        )


def config_files(argv: Sequence[str]) -> list[str]:
    """The files ``--config FILE`` / ``--config=FILE`` name in ``argv``."""
    files = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    return files + [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]


def parse_dataclass(
    cls,
    argv: Sequence[str],
    prog: str,
    description: str,
    error: type[Exception],
    files: list[str] | None = None,
    defaults: dict | None = None,
) -> dict:
    """The field values of dataclass ``cls`` from ``argv`` (already in underscore spelling): ``--config FILE``
    (YAML, later flags override it) and ``--FIELD VALUE`` for every field, typed, its docstring its ``--help``
    (jsonargparse). ``--help`` and ``--print_config`` print and exit; anything else wrong raises ``error`` with
    one line that names the field (and the config ``files``, by default those ``argv`` names). train.py's and
    evaluate.py's parser. ``defaults``: parser defaults by dotted key, where a field's own default is not the
    parser's (a nested section's field left null for its preset to fill)."""
    from jsonargparse import ActionConfigFile, ArgumentError, set_parsing_settings
    from jsonargparse import ArgumentParser as ConfigParser

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ConfigParser(
        prog=prog, description=description, exit_on_error=False, env_prefix=None, default_env=False
    )
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help="YAML file of these fields; flags after it override",
    )
    parser.add_class_arguments(cls, as_group=False)
    if defaults:
        parser.set_defaults(defaults)
    try:
        values = parser.parse_args(list(argv)).as_dict()
    except ArgumentError as problem:
        files = config_files(argv) if files is None else files
        where = f" (config {', '.join(files)} and flags)" if files else ""
        raise error(" ".join(str(problem).split()) + where) from None
    values.pop("config", None)
    values.pop("__path__", None)
    return values


def module_docstring(module: str) -> str:
    """The docstring of ``module`` read from its source, without importing it (``--help`` of a heavy module)."""
    import ast
    from importlib.util import find_spec

    spec = find_spec(module)
    with open(spec.origin, encoding="utf-8") as source:
        return ast.get_docstring(ast.parse(source.read())) or ""


def light_first(check: str, command: str, prefix: str, argv: Sequence[str] | None = None) -> int:
    """Run ``command`` (a module of this package with a ``main(argv)``) after ``check`` (a light module's
    ``parse_args(argv, description)``) has answered ``--help`` and refused bad flags, so that both come before
    torch, DALI and the accelerator are imported: the console scripts' entry. A refusal prints one line,
    ``prefix`` and the message, and returns the error's exit status."""
    import sys
    from importlib import import_module

    from .errors import SimclrError

    package = __name__.rsplit(".", 2)[0]
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import_module(f"{package}.{check}").parse_args(
            argv, module_docstring(f"{package}.{command}")
        )
    except SimclrError as error:
        print(f"{prefix}{error}", file=sys.stderr)
        return error.exit_status
    return import_module(f"{package}.{command}").main(argv)


def train_main() -> int:
    """``simclr-train``: train.py's main, its flags checked first."""
    return light_first("trainer.config", "train", "config error: ")


def evaluate_main() -> int:
    """``simclr-evaluate``: evaluate.py's main, its flags checked first."""
    return light_first("evaluation.config", "evaluate", "evaluate.py: error: ")


def export_main() -> int:
    """``simclr-export``: trainer/export.py's main, its flags checked first."""
    return light_first("trainer.export_args", "trainer.export", "simclr-export: error: ")

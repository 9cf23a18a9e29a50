"""``python tools/typecheck.py``: mypy over the product as the package ``simclr_dali``, from any checkout folder.

The checkout's root is the package (pyproject ``package-dir``) and its folder's name varies (CI clones elsewhere),
so mypy cannot name the modules from the folder: this puts a ``simclr_dali`` link to the checkout in a temporary
folder on ``MYPYPATH`` and checks ``-p simclr_dali`` (tests/, tools/, docker/ excluded: pyproject ``[tool.mypy]``),
where every relative import resolves. It fails on any unresolved import (``import-not-found``, ``attr-defined`` of
a module of ours) and when the remaining type errors exceed the baseline (tools/mypy_baseline.json): the errors are
counted, not silenced, and the count may only go down (``--update`` writes a lower one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = Path(__file__).with_name("mypy_baseline.json")
ERROR = re.compile(
    r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<message>.*?)\s+\[(?P<code>[a-z-]+)\]$"
)
UNRESOLVED = ("import-not-found", "import")  # mypy's codes for an import it cannot find


def run_mypy(root: Path = ROOT) -> list[dict]:
    """mypy's errors over simclr_dali (the checkout linked under that name), one dict per error."""
    with tempfile.TemporaryDirectory(prefix="typecheck-") as folder:
        (Path(folder) / "simclr_dali").symlink_to(root, target_is_directory=True)
        command = [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(root / "pyproject.toml"),
            "-p",
            "simclr_dali",
        ]
        command += ["--cache-dir", str(root / ".mypy_cache"), "--no-error-summary", "--no-pretty"]
        env = {**os.environ, "MYPYPATH": folder}
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    if result.returncode not in (0, 1):
        raise SystemExit(
            f"typecheck: mypy failed (rc {result.returncode}):\n{result.stdout[-3000:]}{result.stderr}"
        )
    return [m.groupdict() for m in map(ERROR.match, result.stdout.splitlines()) if m]


def unresolved(errors: list[dict]) -> list[dict]:
    """Imports mypy could not follow: a missing module, or a name of ours a module does not define."""
    ours = [
        e for e in errors if e["code"] == "attr-defined" and 'Module "simclr_dali' in e["message"]
    ]
    return [e for e in errors if e["code"] in UNRESOLVED] + ours


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--update", action="store_true", help="write the current count as the baseline"
    )
    args = parser.parse_args(argv)
    errors = run_mypy()
    counts = Counter(e["code"] for e in errors)
    baseline = json.loads(BASELINE.read_text())["errors"] if BASELINE.exists() else None
    print(
        f"mypy: {len(errors)} type errors (baseline {baseline}): "
        + ", ".join(f"{c} {n}" for c, n in counts.most_common())
    )
    missing = unresolved(errors)
    for e in missing:
        print(f"unresolved import: {e['path']}:{e['line']}: {e['message']}", file=sys.stderr)
    if args.update:
        BASELINE.write_text(
            json.dumps({"errors": len(errors), "by_code": dict(counts.most_common())}, indent=1)
            + "\n"
        )
        print(f"wrote {BASELINE}")
    if missing:
        return 1
    if baseline is not None and len(errors) > baseline:
        print(
            f"typecheck: {len(errors)} errors, over the baseline of {baseline}: fix the new ones",
            file=sys.stderr,
        )
        return 1
    if baseline is not None and len(errors) < baseline:
        print(
            f"typecheck: below the baseline ({baseline}): lower it with python tools/typecheck.py --update"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

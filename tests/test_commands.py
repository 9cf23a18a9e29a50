"""Every console script (pyproject's [project.scripts]) answers ``--help``, and refuses a bad flag with one line
and status 2, before importing torch: the answer comes in about a second, not after torch's and DALI's imports.
Asserted on ``sys.modules`` at exit (never on a clock, which would flake on a busy machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]

RUN = """
import sys
sys.argv = [{name!r}, *{args!r}]
from {module} import {function}
try:
    status = {function}()
except SystemExit as stop:
    status = stop.code
print("torch imported:", "torch" in sys.modules, "status:", status or 0, file=sys.stderr)
"""


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    module, function = SCRIPTS[name].split(":")
    code = RUN.format(name=name, args=list(args), module=module, function=function)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_every_command_is_covered():
    assert set(SCRIPTS) == {"simclr-train", "simclr-evaluate", "simclr-shards", "simclr-bench", "simclr-export"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_answers_before_torch_is_imported(name):
    done = run_script(name, "--help")
    assert "torch imported: False status: 0" in done.stderr, done.stderr[-2000:]
    assert "usage" in done.stdout.lower() or name == "simclr-bench" and "bench.py" in done.stdout, done.stdout[:500]


@pytest.mark.parametrize("name", ["simclr-train", "simclr-evaluate", "simclr-export"])
def test_a_bad_flag_is_refused_in_one_line_before_torch(name):
    done = run_script(name, "--no_such_flag", "1")
    assert "torch imported: False status: 2" in done.stderr, done.stderr[-2000:]
    assert "no_such_flag" in done.stderr and len(done.stderr.strip().splitlines()) == 2, done.stderr

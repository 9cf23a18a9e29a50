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
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_every_command_is_covered():
    assert set(SCRIPTS) == {
        "simclr-train",
        "simclr-evaluate",
        "simclr-shards",
        "simclr-bench",
        "simclr-export",
    }


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_answers_before_torch_is_imported(name):
    done = run_script(name, "--help")
    assert "torch imported: False status: 0" in done.stderr, done.stderr[-2000:]
    assert "usage" in done.stdout.lower() or name == "simclr-bench" and "bench.py" in done.stdout, (
        done.stdout[:500]
    )


@pytest.mark.parametrize("name", ["simclr-train", "simclr-evaluate", "simclr-export"])
def test_a_bad_flag_is_refused_in_one_line_before_torch(name):
    done = run_script(name, "--no_such_flag", "1")
    assert "torch imported: False status: 2" in done.stderr, done.stderr[-2000:]
    assert "no_such_flag" in done.stderr and len(done.stderr.strip().splitlines()) == 2, done.stderr


# A bad value of the view (augment), the loader or the model's light settings: refused by the parse, one line that
# names the field, status 2, before torch is imported (timm's own checks of a backbone need timm: they come before
# start-up instead, tests/test_faults.py::test_bad_train_input_is_named_in_one_line).
BAD_VALUES = [
    (["--image_size", "3"], "augment.size"),  # the flat spelling of earlier versions
    (["--augment.size", "4"], "augment.size"),
    (["--jitter_strength", "11"], "augment.jitter_strength"),
    (["--augment.blur_prob", "1.5"], "augment.blur_prob"),
    (["--augment.flip_prob", "-0.1"], "augment.flip_prob"),
    (["--augment.crop_area", "[0.5, 0.2]"], "augment.crop_area"),
    (["--min_crop_area", "0"], "augment.crop_area"),
    (["--augment.crop_aspect", "[2, 1]"], "augment.crop_aspect"),
    (["--augment.blur_sigma", "[0, 1]"], "augment.blur_sigma"),
    (["--augment.crop_attempts", "0"], "augment.crop_attempts"),
    (["--augment.crop_sampler", "nope"], "crop_sampler"),
    (["--augment", "tiny"], "preset"),
    (["--augment.hue", "nan"], "augment.hue"),
    (["--augment.no_such_field", "1"], "no_such_field"),
    (["--prefetch", "0"], "loader.prefetch"),  # a flat spelling of earlier versions
    (["--loader.shuffle_buffer", "0"], "loader.shuffle_buffer"),
    (["--data_threads", "0"], "loader.threads"),
    (["--loader.device", "tpu"], "loader.device"),
    (["--loader.kind", "pytorch"], "loader.kind"),
    (["--proj_dim", "0"], "proj_dim"),
    (["--proj_hidden", "-1"], "proj_hidden"),
    (["--timm_kwargs", '{"num_classes": 10}'], "num_classes"),
    (["--epochs", "inf"], "epochs"),
    (["--warmup_epochs", "200"], "warmup_epochs"),
]


@pytest.mark.parametrize(
    "flags,named", BAD_VALUES, ids=lambda value: " ".join(value) if isinstance(value, list) else ""
)
def test_a_bad_config_value_is_refused_before_torch(flags, named):
    done = run_script("simclr-train", "--train_shards", "x", *flags)
    assert "torch imported: False status: 2" in done.stderr, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("config error: ") and named in lines[0], (
        done.stderr
    )

"""Checkpoints that survive crashes: written to a temporary directory, then renamed into place.

A checkpoint directory ``OUTPUT/checkpoints/step_00001234`` holds Accelerate's state (model, optimiser,
scheduler, every process's RNG state) plus ``trainer_state.json`` (step, epoch, each rank's data-loader
position). A directory appears under its final name only once complete, so ``--resume auto`` never
picks up a half-written checkpoint."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"step_(\d+)")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """'' -> None; 'auto' -> newest checkpoint in output_dir (or None); else the given directory."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"resume={resume}: not a checkpoint directory (no {STATE_FILE})")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict, loader_state: dict, keep: int) -> Path:
    """Collective: every process calls it. Returns the final checkpoint path."""
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    loader_states = gather_object([loader_state])  # one per rank, in rank order
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "loaders": loader_states}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[dict, dict]:
    """Restores Accelerate's state; returns (trainer state, this rank's loader state)."""
    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text())
    loaders = state.pop("loaders")
    if len(loaders) != accelerator.num_processes:
        raise ValueError(f"checkpoint {path} was written by {len(loaders)} processes; this run has {accelerator.num_processes}. "
                         "Exact resume needs the same number of processes.")
    return state, loaders[accelerator.process_index]

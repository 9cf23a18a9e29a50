"""Checkpoints that survive crashes and are verified before they are trusted; no pickle is written or read.

A checkpoint is a directory ``OUTPUT_DIR/checkpoints/step_00001234`` of plain data:

    model.safetensors      the model's state dict: parameters and buffers (``backbone.*``, ``head.*``)
    optimizer.safetensors  the optimiser's per-parameter state tensors, named ``state/<param index>/<name>``
    optimizer.json         its param groups (hyper-parameters and parameter indices) and non-tensor state
    rng.json               every rank's RNG states: torch CPU and CUDA (base64 bytes), Python's and NumPy's
                           Mersenne Twister (integers)
    trainer_state.json     run id, step, epoch, steps per epoch, world size, training seconds, evaluation
                           history, the resolved config, each rank's data-loader position, the fp16 grad scaler
    manifest.json          written last: the format, run id, step, and every other file's size and SHA-256

The learning-rate schedule is not stored: it is a pure function of (config, step), rebuilt on resume.

Writing (every rank calls ``Checkpointer.save``; rank 0 writes): the files go into ``.tmp-RUNID-step_N-PID``,
each fsynced, then the manifest, the directory itself, the rename onto its final name and the parent
directory; a crash at any point leaves either the complete checkpoint or a temporary that the next start
removes. The new checkpoint is read back and verified; only then are this run's older checkpoints rotated
(``keep_checkpoints``), so the newest verified checkpoint is never deleted. Loading verifies every file it
reads against the manifest and fails loudly, naming the file, when one is missing or damaged."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..common.errors import ExitStatus, SimclrError
from ..common.files import fsync_directory, replace_directory, restore_replaced, write_durable
from ..common.manifest import (
    CHECKPOINT_MANIFEST,
    ManifestError,
    digest,
    read_manifest,
    verify_directory,
)
from ..common.manifest import read_verified as manifest_read_verified

FORMAT = "simclr-checkpoint/1"
MANIFEST = CHECKPOINT_MANIFEST
STATE_FILE = "trainer_state.json"
FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.json", STATE_FILE)
_NAME = re.compile(r"step_(\d+)")


class CheckpointError(SimclrError, RuntimeError):
    """A checkpoint cannot be verified or loaded; the message names the directory and file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint cannot be written (disk full, permissions); the previous ones are intact."""

    exit_status = ExitStatus.OTHER


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_step(path: Path) -> int:
    return int(_NAME.fullmatch(path.name).group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Directories named like checkpoints (``step_N`` holding a manifest), oldest step first; not verified."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and _NAME.fullmatch(p.name) and (p / MANIFEST).exists()
    ]
    return sorted(found, key=checkpoint_step)


def manifest_run_id(path: Path) -> str | None:
    """The run a checkpoint belongs to, from its manifest (None when the manifest cannot be read)."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _digest(data: bytes) -> str:
    return digest(data)


def verify_checkpoint(path: Path) -> dict:
    """The checkpoint's manifest once every file it lists has its size and SHA-256; else ``CheckpointError``
    naming the file (``common.manifest``: the same gate evaluation and export use)."""
    try:
        return verify_directory(path, MANIFEST, (FORMAT,), FILES)
    except ManifestError as error:
        raise CheckpointError(str(error)) from None


def read_verified(path: Path, name: str, manifest: dict) -> bytes:
    """The bytes of ``path/name`` after checking them against the manifest's size and SHA-256."""
    try:
        return manifest_read_verified(path, name, manifest, MANIFEST)
    except ManifestError as error:
        raise CheckpointError(str(error)) from None


def read_verified_json(path: Path, name: str, manifest: dict):
    try:
        return json.loads(read_verified(path, name, manifest))
    except ValueError as error:
        raise CheckpointError(f"{path / name} is not valid JSON ({error})") from None


# --------------------------------------------------------------------------- state <-> plain data


def rng_state() -> dict:
    """This process's RNG states as JSON data."""
    version, mt, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = base64.b64encode(
            torch.cuda.get_rng_state().numpy().tobytes()
        ).decode()
    return state


def set_rng_state(state: dict, where: str) -> None:
    """Restore ``rng_state()``'s output; any missing or malformed field is a ``CheckpointError`` naming it."""
    field_name = "torch_cpu"
    try:
        torch.set_rng_state(
            torch.frombuffer(bytearray(base64.b64decode(state["torch_cpu"])), dtype=torch.uint8)
        )
        field_name = "python"
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
        field_name = "numpy"
        numpy = state["numpy"]
        np.random.set_state(
            (
                numpy["kind"],
                np.array(numpy["keys"], dtype=np.uint32),
                numpy["pos"],
                numpy["has_gauss"],
                numpy["cached_gaussian"],
            )
        )
        if "torch_cuda" in state and torch.cuda.is_available():
            field_name = "torch_cuda"
            torch.cuda.set_rng_state(
                torch.frombuffer(
                    bytearray(base64.b64decode(state["torch_cuda"])), dtype=torch.uint8
                )
            )
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"{where}: the {field_name} RNG state cannot be restored ({type(error).__name__}: {error})"
        ) from None


def _optimizer_files(optimizer) -> tuple[bytes, bytes]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{index}/{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    described = {"param_groups": state["param_groups"], "scalars": scalars}
    return save_safetensors(tensors), json.dumps(described, default=repr).encode()


def _load_optimizer(
    optimizer, tensors: dict[str, torch.Tensor], described: dict, where: Path
) -> None:
    """The saved per-parameter state into ``optimizer``; its param groups (lr, momentum, ...) stay as the
    config built them: the hyper-parameters are the config's and the lr the schedule's at the step."""
    fresh = optimizer.state_dict()
    saved_sizes = [len(group["params"]) for group in described.get("param_groups", [])]
    sizes = [len(group["params"]) for group in fresh["param_groups"]]
    if saved_sizes != sizes:
        raise CheckpointError(
            f"{where / 'optimizer.json'}: parameter groups of sizes {saved_sizes}, this model's optimiser has {sizes} "
            "(another architecture or optimiser)"
        )
    state: dict[int, dict] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in described.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": fresh["param_groups"]})


def _load_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    reshaped = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or reshaped:
        examples = (reshaped or missing or unexpected)[:3]
        raise CheckpointError(
            f"{where / 'model.safetensors'} does not fit this model "
            f"({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(reshaped)} reshaped tensors, e.g. {examples}): a checkpoint of another architecture"
        )
    model.load_state_dict(tensors)


@dataclass
class TrainingState:
    """What the loop carries between steps besides the model and optimiser."""

    step: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)


@dataclass
class Saved:
    path: Path
    seconds: float
    bytes: int


class Checkpointer:
    """Writes and loads this run's checkpoints (see the module docstring); every method is a collective."""

    def __init__(
        self,
        accelerator,
        control,
        run_id: str,
        output_dir: str | Path,
        keep: int,
        every_minutes: float | None,
    ):
        self.accelerator, self.control, self.run_id = accelerator, control, run_id
        self.root, self.keep, self.every_minutes = checkpoint_dir(output_dir), keep, every_minutes
        self.last_step, self.last_path, self._last_time = None, None, time.monotonic()

    def due_by_clock(self) -> bool:
        return (
            bool(self.every_minutes)
            and time.monotonic() - self._last_time >= 60 * self.every_minutes
        )

    def save(self, model, optimizer, state: dict, loader_state: dict) -> Saved:
        """Write a checkpoint of ``state['step']`` (JSON data) with this rank's data position ``loader_state``."""
        started = time.perf_counter()
        per_rank = self.control.all_gather_json({"rng": rng_state(), "loader": loader_state})
        step, error, saved = state["step"], None, None
        if self.control.is_main:
            final = self.root / f"step_{step:08d}"
            staging = self.root / f".tmp-{self.run_id}-step_{step:08d}-{os.getpid()}"
            try:
                scaler = getattr(self.accelerator, "scaler", None)
                trainer_state = {
                    "format": FORMAT,
                    "run_id": self.run_id,
                    **state,
                    "world_size": self.control.world_size,
                    "loaders": [r["loader"] for r in per_rank],
                    "grad_scaler": scaler.state_dict() if scaler is not None else None,
                }
                model_state = {
                    k: v.detach().to("cpu").contiguous()
                    for k, v in self.accelerator.unwrap_model(model).state_dict().items()
                }
                optimizer_tensors, optimizer_json = _optimizer_files(optimizer)
                files = {
                    "model.safetensors": save_safetensors(
                        model_state, metadata={"format": FORMAT, "step": str(step)}
                    ),
                    "optimizer.safetensors": optimizer_tensors,
                    "optimizer.json": optimizer_json,
                    "rng.json": json.dumps({"ranks": [r["rng"] for r in per_rank]}).encode(),
                    STATE_FILE: json.dumps(trainer_state).encode(),
                }
                staging.mkdir(parents=True)
                for name, data in files.items():
                    write_durable(staging / name, data)
                manifest = {
                    "format": FORMAT,
                    "run_id": self.run_id,
                    "step": step,
                    "files": {
                        name: {"bytes": len(data), "sha256": _digest(data)}
                        for name, data in files.items()
                    },
                }
                write_durable(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
                fsync_directory(staging)
                replace_directory(staging, final)
                verify_checkpoint(final)  # read back before anything older is deleted
                self._rotate(final)
                saved = {
                    "path": str(final),
                    "seconds": time.perf_counter() - started,
                    "bytes": sum(map(len, files.values())),
                }
            except (OSError, CheckpointError) as failure:
                shutil.rmtree(staging, ignore_errors=True)
                error = f"cannot write checkpoint {final}: {getattr(failure, 'strerror', None) or failure}"
        error = self.control.first_error(error)
        if error:
            raise CheckpointWriteError(error + "; the previous checkpoints are intact")
        saved = self.control.broadcast_json(saved)
        self.last_step, self.last_path, self._last_time = (
            step,
            Path(saved["path"]),
            time.monotonic(),
        )
        return Saved(Path(saved["path"]), saved["seconds"], saved["bytes"])

    def _rotate(self, newest: Path) -> None:
        """Delete this run's oldest checkpoints beyond ``keep``: never ``newest``, never another run's."""
        mine = [
            p
            for p in list_checkpoints(self.root.parent)
            if p != newest and manifest_run_id(p) == self.run_id
        ]
        for old in mine[: max(0, len(mine) - (self.keep - 1))]:
            remove_checkpoint(old)

    def load(self, path: Path, model, optimizer, world_size_changed: bool) -> tuple[dict, dict]:
        """Load ``path`` (chosen by rank 0) into ``model`` and ``optimizer`` and this rank's RNG; returns
        (trainer state, this rank's loader state; with another world size, the saved epoch's beginning). Every
        file read is checked against the manifest; a failure on any rank is a ``CheckpointError`` on every rank."""
        error, state, loader_state = None, None, None
        rank = self.control.rank
        try:
            manifest = verify_manifest_only(path)
            state = read_verified_json(path, STATE_FILE, manifest)
            _load_model(
                self.accelerator.unwrap_model(model),
                load_safetensors(read_verified(path, "model.safetensors", manifest)),
                path,
            )
            _load_optimizer(
                optimizer,
                load_safetensors(read_verified(path, "optimizer.safetensors", manifest)),
                read_verified_json(path, "optimizer.json", manifest),
                path,
            )
            ranks = read_verified_json(path, "rng.json", manifest).get("ranks", [])
            if rank < len(ranks):
                set_rng_state(ranks[rank], f"{path / 'rng.json'} (rank {rank})")
            elif not world_size_changed:
                raise CheckpointError(
                    f"{path / 'rng.json'} holds {len(ranks)} ranks' RNG states; rank {rank} has none"
                )
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None and state.get("grad_scaler"):
                scaler.load_state_dict(state["grad_scaler"])
            loaders = state.get("loaders") or []
            if not loaders:
                raise CheckpointError(f"{path / STATE_FILE} holds no data-loader state")
            loader_state = (
                epoch_start_state(loaders[0].get("epoch", 0), rank, self.control.world_size)
                if world_size_changed
                else loaders[rank]
            )
        except CheckpointError as failure:
            error = str(failure)
        except (
            KeyError,
            TypeError,
            ValueError,
            RuntimeError,
        ) as failure:  # safetensors/torch on malformed content
            error = f"{path}: cannot be loaded ({type(failure).__name__}: {failure})"
        error = self.control.first_error(error)
        if error:
            raise CheckpointError(error)
        self.last_step, self.last_path, self._last_time = state["step"], path, time.monotonic()
        return state, loader_state


def epoch_start_state(epoch: int, rank: int, world_size: int) -> dict:
    """A data-loader state at the beginning of ``epoch`` (``DaliLoader.load_state_dict`` starts a fresh pipeline
    there): where a rank's exact position is lost (bad data) or meaningless (another world size)."""
    return {"shard_id": rank, "num_shards": world_size, "epoch": epoch, "dali_checkpoint": None}


def verify_manifest_only(path: Path) -> dict:
    """The manifest, checked for form only (each file is verified as it is read)."""
    try:
        return read_manifest(path, MANIFEST, (FORMAT,))
    except ManifestError as error:
        raise CheckpointError(str(error)) from None


def choose_checkpoint(output_dir: str | Path, run_id: str, say) -> tuple[Path | None, list[str]]:
    """(This run's newest checkpoint that verifies, the checkpoints that did not). Rank 0 calls it; each one
    that fails is renamed ``step_N.unusable`` (kept for inspection, never picked again) and reported by ``say``."""
    restore_replaced(checkpoint_dir(output_dir))
    unusable = []
    for path in reversed(list_checkpoints(output_dir)):
        owner = manifest_run_id(path)
        if owner is not None and owner != run_id:
            continue
        try:
            verify_checkpoint(path)
            return path, unusable
        except CheckpointError as error:
            aside = path.with_name(path.name + ".unusable")
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(path, aside)
            unusable.append(str(path))
            say(
                f"checkpoint {path} fails verification ({error}); set aside as {aside.name}, "
                "falling back to the previous one"
            )
    return None, unusable


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that no incomplete one is ever left under a final name: renamed to
    ``.deleting-step_N-PID`` first (one atomic step), then removed; a crash in between leaves only the
    hidden name, which the next start's ``clean_temporaries`` removes."""
    aside = path.with_name(f".deleting-{path.name}-{os.getpid()}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _incomplete(path: Path) -> bool:
    """A ``step_N`` directory without a manifest: never completed (or emptied by a rotation of an older
    version); never chosen for resume, so only a sweep can remove it."""
    return path.is_dir() and bool(_NAME.fullmatch(path.name)) and not (path / MANIFEST).exists()


def clean_temporaries(output_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """Remove what a crash left: ``run_id``'s temporary checkpoints, or, when it is None (the run holds the
    directory's lock), every run's temporaries, checkpoints half deleted by a rotation and incomplete ``step_N``
    directories."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    prefixes = (f".tmp-{run_id}-",) if run_id else (".tmp-", ".tmp_step_", ".deleting-")
    removed = [
        p
        for p in root.iterdir()
        if p.name.startswith(prefixes) or (run_id is None and _incomplete(p))
    ]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return removed

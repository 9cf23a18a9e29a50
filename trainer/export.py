"""The pretrained model, exported for use outside this project: the backbone and the projection head.

An export directory holds
- ``backbone.safetensors`` + ``backbone.json`` (timm model name, feature width, CIFAR stem, timm arguments,
  image size; the same metadata in the safetensors header): what ``evaluate.py --checkpoint`` reads;
- ``backbone/`` (``config.json`` + ``model.safetensors``, timm's own local-directory convention) wherever timm
  can express the architecture, i.e. without the CIFAR stem (it replaces timm's own):
  ``timm.create_model("local-dir:EXPORT/backbone", pretrained=True)``;
- ``head.safetensors`` + ``head.json`` (the projection head's widths and depth), when the head is exported:
  ``evaluate.py --ft_proj_selector J`` keeps its first J layers on top of the backbone (SimCLRv2).
``load_exported(EXPORT)`` rebuilds both from any export, the CIFAR stem and ``timm_kwargs`` included.

train.py exports its output directory at the end of a run; ``simclr-export CHECKPOINT`` (``main`` below)
exports any checkpoint, final or preempted. Every file is written beside its final name and renamed into place
(``common.files``); the command's export directory and timm's ``backbone/`` are staged whole and renamed onto
their names by ``replace_directory`` (a crash between its two renames is undone by ``restore_replaced``)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save

from ..common.errors import ExitStatus, SimclrError
from ..common.files import (
    WriteFailure,
    atomic_write_bytes,
    atomic_write_text,
    create_temporary_directory,
    fsync_directory,
    give_open_mode,
    replace_directory,
    restore_replaced,
)
from ..common.files import write_result as write_common_result
from ..common.manifest import EXPORT_MANIFEST, file_entry
from ..common.timm_args import check_timm_kwargs
from ..evaluation.backbone import BackboneError, load_backbone
from ..evaluation.head_layers import head_from_export
from ..model.settings import model_settings
from ..model.simclr import SimCLR
from ..pipeline.augment_config import view_size
from .checkpoint import (
    STATE_FILE,
    CheckpointError,
    CheckpointWriteError,
    list_checkpoints,
    read_verified,
    read_verified_json,
    verify_checkpoint,
)
from .export_args import parse_args

HEAD_FILE = "head.safetensors"
HEAD_META = "head.json"
EXPORT_FORMAT = "simclr-export/1"
EXPORT_FILES = (
    "backbone.safetensors",
    "backbone.json",
    HEAD_FILE,
    HEAD_META,
    "backbone/config.json",
    "backbone/model.safetensors",
)


class ResultWriteError(CheckpointWriteError):
    """A result of the run (the export, the summary) cannot be written (disk full, permissions): the message
    names the path; train.py exits 1 on it as on a checkpoint that cannot be written, and the checkpoints are
    intact (``--resume auto`` repeats the export)."""


def write_result(path: str | Path, data: bytes | str, what: str = "result") -> Path:
    """``common.files.write_result``, its failure a ``ResultWriteError`` (train.py exits 1 on it)."""
    try:
        return write_common_result(path, data, what)
    except WriteFailure as error:
        raise ResultWriteError(error.strerror) from None


class ExportError(SimclrError, ValueError):
    """A checkpoint or an export cannot be read as asked; the message names the file."""


def export_backbone(
    backbone: torch.nn.Module,
    output_dir: str | Path,
    meta: dict,
    head: torch.nn.Module | None = None,
) -> Path:
    """Write the exports above for ``backbone`` (a timm model with ``num_classes=0``) and, if given, the
    projection ``head``, then ``export-manifest.json`` (every file's size and SHA-256, verified by every reader);
    returns the ``.safetensors`` path. ``meta``: model_name, num_features, cifar_stem, timm_kwargs, image_size.
    A failed write (a full disk) is a ``ResultWriteError`` naming the export directory."""
    output_dir = Path(output_dir)
    try:
        (output_dir / EXPORT_MANIFEST).unlink(
            missing_ok=True
        )  # never a manifest of the previous export's files
        weights = _write_export(backbone, output_dir, meta, head)
        _write_export_manifest(output_dir)
    except OSError as error:
        where = error.filename or output_dir
        raise ResultWriteError(
            f"cannot write the export in {output_dir} ({where}: {error.strerror or error})"
        ) from None
    return weights


def _write_export_manifest(output_dir: Path) -> None:
    """The export's manifest, written last: what ``evaluation.backbone.verify_source`` checks every file against."""
    present = [name for name in EXPORT_FILES if (output_dir / name).is_file()]
    files = {name: file_entry((output_dir / name).read_bytes()) for name in present}
    atomic_write_text(
        output_dir / EXPORT_MANIFEST,
        json.dumps({"format": EXPORT_FORMAT, "files": files}, indent=1),
    )


def _write_export(backbone, output_dir: Path, meta: dict, head) -> Path:
    weights = output_dir / "backbone.safetensors"
    # bytes written by atomic_write_bytes: safetensors' save_file would make the file 0600
    atomic_write_bytes(
        weights, save(_plain_state(backbone), metadata={k: json.dumps(v) for k, v in meta.items()})
    )
    atomic_write_text(output_dir / "backbone.json", json.dumps(meta, indent=1) + "\n")
    if not meta.get("cifar_stem"):
        _export_local_dir(backbone, output_dir / "backbone", meta)
    if head is not None:
        linear = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
        widths = {
            "in_dim": linear[0].in_features,
            "hidden_dim": linear[0].out_features,
            "out_dim": linear[-1].out_features,
            "num_layers": len(linear),  # issue 31: SimCLRv2's 3-layer head
        }
        atomic_write_bytes(
            output_dir / HEAD_FILE,
            save(_plain_state(head), metadata={k: json.dumps(v) for k, v in widths.items()}),
        )
        atomic_write_text(output_dir / HEAD_META, json.dumps(widths, indent=1) + "\n")
    return weights


def _plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _export_local_dir(backbone: torch.nn.Module, target: Path, meta: dict) -> None:
    """timm's ``save_for_hf`` layout in ``target`` (replaced as a whole, never left half-written)."""
    from timm.models import save_for_hf

    size = meta.get("image_size") or 224
    backbone = (
        copy.deepcopy(backbone).cpu().to(memory_format=torch.contiguous_format)
    )  # safetensors stores contiguous tensors
    backbone.pretrained_cfg = {
        **(backbone.pretrained_cfg or {}),
        "tag": "simclr",
        "input_size": [3, size, size],
        "test_input_size": [3, size, size],
    }
    restore_replaced(
        target.parent
    )  # a crash inside an earlier replacement: its old copy back first
    staging = create_temporary_directory(target.parent, prefix=".backbone-")
    try:
        save_for_hf(
            backbone,
            staging,
            model_args={**meta.get("timm_kwargs", {}), "num_classes": 0},
            safe_serialization=True,
        )
        for file in staging.iterdir():
            give_open_mode(
                file
            )  # timm writes model.safetensors through safetensors' save_file: 0600
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(staging)
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- from a checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint (``checkpoints/step_N``), else the newest checkpoint of the
    train.py output directory ``path`` that verifies; ``ExportError`` naming what is missing otherwise."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"checkpoint {path} does not exist")
    if (path / "manifest.json").is_file():
        return path
    candidates = list_checkpoints(path)
    if not candidates:
        raise ExportError(
            f"{path} is neither a checkpoint (checkpoints/step_N with a manifest.json) nor a train.py output "
            "directory with one under checkpoints/"
        )
    failures = []
    for candidate in reversed(candidates):
        try:
            verify_checkpoint(candidate)
            return candidate
        except CheckpointError as error:
            failures.append(str(error))
    raise ExportError(f"no checkpoint in {path / 'checkpoints'} verifies: {'; '.join(failures)}")


def export_checkpoint(checkpoint: str | Path, output_dir: str | Path | None = None) -> Path:
    """Export the backbone and head of ``checkpoint`` (a checkpoint directory or a train.py output directory:
    its newest verified checkpoint) into ``output_dir`` (default ``RUN/exports/step_N``); returns it."""
    path = resolve_checkpoint(checkpoint)
    try:
        manifest = verify_checkpoint(path)
        config = read_verified_json(path, STATE_FILE, manifest).get("config")
        state = load_safetensors(read_verified(path, "model.safetensors", manifest))
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    settings = model_settings(config) if isinstance(config, dict) else {}
    if not isinstance(config, dict) or not isinstance(settings.get("backbone"), str):
        raise ExportError(f"{path / STATE_FILE} holds no config with a backbone name")
    try:
        timm_kwargs = check_timm_kwargs(
            settings.get("timm_kwargs") or {}, f"{path / STATE_FILE}: timm_kwargs"
        )
    except ValueError as error:
        raise ExportError(str(error)) from None
    model = SimCLR(
        backbone=settings["backbone"],
        proj_hidden=settings.get("proj_hidden"),
        proj_dim=settings.get("proj_dim", 128),
        proj_layers=settings.get("proj_layers", 2),
        cifar_stem=bool(settings.get("cifar_stem", False)),
        **timm_kwargs,
    )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ExportError(
            f"{path / 'model.safetensors'} does not fit the model its config describes: {error}"
        ) from None
    meta = {
        "model_name": settings["backbone"],
        "num_features": model.feature_dim,
        "cifar_stem": bool(settings.get("cifar_stem", False)),
        "timm_kwargs": timm_kwargs,
        "image_size": view_size(config),
        "step": manifest.get("step"),
        "run_id": manifest.get("run_id"),
    }
    output_dir = Path(output_dir) if output_dir else path.parent.parent / "exports" / path.name
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    restore_replaced(output_dir.parent)
    staging = create_temporary_directory(output_dir.parent, prefix=f".{output_dir.name}-")
    try:
        export_backbone(model.backbone.eval(), staging, meta, head=model.head.eval())
        fsync_directory(staging)
        replace_directory(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


# --------------------------------------------------------------------------- loading an export


def load_exported(path: str | Path) -> tuple[torch.nn.Module, torch.nn.Module | None, dict]:
    """(backbone, head or None, metadata) rebuilt from an export directory (or a train.py output directory),
    in eval mode: the CIFAR stem and ``timm_kwargs`` from ``backbone.json``, the head's widths from
    ``head.json``. The backbone maps (B, 3, H, W) to (B, num_features), the head those features to z."""
    path = Path(path)
    try:
        backbone, _ = load_backbone(checkpoint=str(path))
    except BackboneError as error:
        raise ExportError(str(error)) from None
    meta = (
        json.loads((path / "backbone.json").read_text())
        if (path / "backbone.json").is_file()
        else {}
    )
    head = None
    if (path / HEAD_META).is_file():
        try:
            head = head_from_export(path)
        except BackboneError as error:
            raise ExportError(str(error)) from None
        head.eval()
    return backbone.eval(), head, meta


def main(argv: list[str] | None = None) -> int:
    """``simclr-export CHECKPOINT [--output_dir DIR]``: the backbone and head of a checkpoint, final or preempted."""
    try:
        args = parse_args(argv, __doc__)
    except SimclrError as error:
        print(f"simclr-export: error: {error}", file=sys.stderr)
        return error.exit_status
    try:
        source = resolve_checkpoint(args.checkpoint)
        out = export_checkpoint(source, args.output_dir)
    except SimclrError as error:  # bad input (2), or a full disk writing the export (1)
        print(f"simclr-export: error: {error}", file=sys.stderr)
        return error.exit_status
    except OSError as error:
        print(f"simclr-export: error: {error}", file=sys.stderr)
        return ExitStatus.BAD_INPUT
    files = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()))
    print(f"exported {source} -> {out}: {files}")
    return ExitStatus.DONE


if __name__ == "__main__":
    sys.exit(main())

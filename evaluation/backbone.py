"""Load the backbone to evaluate: from a train.py run or checkpoint, an exported safetensors file, or any
timm model (optionally with a weights file).

Files here may come from anyone, so nothing is unpickled: weights are safetensors or ``torch.load(...,
weights_only=True)`` (tensors only), and the architecture metadata read from a file (``backbone.json``, a
safetensors header, a checkpoint's ``trainer_state.json``) is checked before it reaches timm: a string
model name and only architecture arguments in ``timm_kwargs`` (``common.timm_args``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..common.errors import SimclrError
from ..common.manifest import (
    CHECKPOINT_MANIFEST,
    EXPORT_MANIFEST,
    ManifestError,
    verify_directory,
    verify_file,
)
from ..common.timm_args import check_timm_kwargs
from ..model.settings import model_settings
from ..model.simclr import create_backbone
from ..pipeline.augment_config import view_size

CHECKPOINT_FORMS = (
    "a train.py output directory, a checkpoint directory (checkpoints/step_N), an export directory, or a weights "
    "file (.safetensors, or a torch state dict: .pt/.pth/.bin)"
)
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class BackboneError(SimclrError, ValueError):
    """The backbone cannot be loaded as asked; the message names the file."""


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (a state dict, or a dict holding one under
    ``state_dict``/``model``); anything else is a ``BackboneError`` naming the file."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors and torch raise a variety of types for a damaged file
        first_line = (str(error).splitlines() or [""])[0][:160]
        raise BackboneError(
            f"weights file {path} cannot be read ({type(error).__name__}: {first_line}); expected {CHECKPOINT_FORMS}"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"weights file {path} does not hold a state dict (name -> tensor)")
    return state


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise BackboneError(f"{path} cannot be read as JSON ({error})") from None
    if not isinstance(value, dict):
        raise BackboneError(f"{path} holds {type(value).__name__}, not a JSON object")
    return value


def _checked_meta(meta: dict, source: Path) -> dict:
    """Architecture metadata from a file, checked before it reaches timm: a string model name, a boolean stem
    and only architecture arguments in ``timm_kwargs`` (common/timm_args.py); else ``BackboneError``."""
    if "model_name" in meta and not isinstance(meta["model_name"], str):
        raise BackboneError(f"{source}: model_name must be a string, got {meta['model_name']!r}")
    if not isinstance(meta.get("cifar_stem", False), bool):
        raise BackboneError(
            f"{source}: cifar_stem must be true or false, got {meta['cifar_stem']!r}"
        )
    try:
        meta["timm_kwargs"] = check_timm_kwargs(
            meta.get("timm_kwargs") or {}, f"{source}: timm_kwargs"
        )
    except ValueError as error:
        raise BackboneError(str(error)) from None
    return meta


def _file_meta(weights_file: Path) -> dict:
    """Architecture metadata for an exported weights file: ``NAME.json`` or ``backbone.json`` beside it,
    else the metadata ``export_backbone`` stores in the safetensors header."""
    for candidate in (weights_file.with_suffix(".json"), weights_file.parent / "backbone.json"):
        if candidate.is_file():
            return _checked_meta(_read_json(candidate), candidate)
    if weights_file.suffix == ".safetensors":
        try:
            with safe_open(str(weights_file), "pt") as handle:
                header = handle.metadata() or {}
            meta = {k: json.loads(v) for k, v in header.items()} if "model_name" in header else {}
        except Exception as error:
            raise BackboneError(
                f"weights file {weights_file} cannot be read ({type(error).__name__}: {error})"
            ) from None
        return _checked_meta(meta, weights_file)
    return {}


def load_weights_into(
    backbone: torch.nn.Module, state: dict[str, torch.Tensor], source: str, description: str
) -> None:
    """``backbone.load_state_dict(state)`` after checking names and shapes, so that a checkpoint of another
    architecture is a ``BackboneError`` naming the file and the keys that do not fit (not a traceback)."""
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if mismatched:
            problems.append(
                f"{len(mismatched)} tensors of another shape (e.g. {'; '.join(mismatched[:3])})"
            )
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        raise BackboneError(
            f"{source} does not fit a {description} backbone: {', '.join(problems)}; "
            "is it a checkpoint of another architecture (--model)?"
        )
    backbone.load_state_dict(state)


def verify_source(path: Path) -> str:
    """Check what ``--checkpoint`` names against its manifest before anything in it is read (``common.manifest``,
    the gate resume and export use): a checkpoint directory must have a verifying ``manifest.json``; an export
    directory, or a weights file, is verified by the manifest beside it when there is one (exports written
    before manifests existed, and hand-copied weights, have none). Returns how it was checked; raises
    ``BackboneError`` naming the damaged file."""
    try:
        if path.is_file():
            return "verified by its manifest" if verify_file(path) else "no manifest"
        if (path / EXPORT_MANIFEST).is_file():
            verify_directory(path, EXPORT_MANIFEST)
            return f"verified by {EXPORT_MANIFEST}"
        if (path / "trainer_state.json").exists() and not (path / "backbone.json").exists():
            verify_directory(
                path, CHECKPOINT_MANIFEST, required=("model.safetensors", "trainer_state.json")
            )
            return f"verified by {CHECKPOINT_MANIFEST}"
    except ManifestError as error:
        raise BackboneError(f"checkpoint {path} is refused: {error}") from None
    return "no manifest"


def _meta_for(path: Path) -> dict:
    """Architecture metadata: backbone.json beside an export, or trainer_state.json's config in a checkpoint."""
    if (path / "backbone.json").exists():
        return _checked_meta(_read_json(path / "backbone.json"), path / "backbone.json")
    if (path / "trainer_state.json").exists():
        config = _read_json(path / "trainer_state.json").get("config")
        model = model_settings(config) if isinstance(config, dict) else {}
        if not isinstance(config, dict) or not isinstance(model.get("backbone"), str):
            raise BackboneError(
                f"{path / 'trainer_state.json'} holds no config with a backbone name"
            )
        return _checked_meta(
            {
                "model_name": model["backbone"],
                "cifar_stem": model.get("cifar_stem", False),
                "timm_kwargs": model.get("timm_kwargs") or {},
                "image_size": view_size(config),
            },
            path / "trainer_state.json",
        )
    raise BackboneError(
        f"{path} holds neither backbone.json nor trainer_state.json: expected {CHECKPOINT_FORMS}"
    )


def load_backbone(
    checkpoint: str | None = None,
    model_name: str | None = None,
    weights: str | None = None,
    random_init: bool = False,
    seed: int = 0,
) -> tuple[torch.nn.Module, dict]:
    """Returns (backbone with num_classes=0, info dict with model_name, image_size (if known), source, sha256).

    ``checkpoint``: a train.py output directory, a checkpoint directory (``checkpoints/step_*``) or a
    ``backbone.safetensors`` file. ``model_name`` (+ ``weights``): any timm model. ``random_init``: the
    same architecture with freshly initialised weights (the baseline)."""
    state, source = None, None
    if checkpoint:
        path = Path(checkpoint)
        if not path.exists():
            raise BackboneError(f"checkpoint {path} does not exist")
        if path.is_file() and path.suffix.lower() not in WEIGHTS_SUFFIXES:
            raise BackboneError(
                f"checkpoint {path} is not a weights file: expected {CHECKPOINT_FORMS}"
            )
        verify_source(path)
        if path.is_file():
            meta = _file_meta(path)
            weights_file = path
        else:
            meta = _meta_for(path)
            weights_file = (
                path / "backbone.safetensors"
                if (path / "backbone.safetensors").exists()
                else path / "model.safetensors"
            )
        if model_name:
            meta["model_name"] = model_name
        if "model_name" not in meta:
            raise BackboneError(
                f"{path}: no backbone.json beside it; pass --model NAME to say which timm architecture it is"
            )
        if not random_init:
            if not weights_file.exists():
                raise BackboneError(f"{path}: no weights file {weights_file.name}")
            state = _read_weights(weights_file)
            if weights_file.name == "model.safetensors":  # a full SimCLR state from a checkpoint
                state = {
                    k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")
                }
            source = str(weights_file)
    elif model_name:
        meta = {"model_name": model_name, "cifar_stem": False, "timm_kwargs": {}}
        if weights and not random_init:
            weights_path = Path(weights)
            if not weights_path.is_file():
                raise BackboneError(f"weights file {weights_path} does not exist")
            state = _read_weights(weights_path)
            source = str(weights_path)
    else:
        raise BackboneError(
            "say which backbone to evaluate: --checkpoint PATH or --model NAME [--weights FILE]"
        )
    torch.manual_seed(seed)
    try:
        backbone = create_backbone(
            meta["model_name"],
            cifar_stem=meta.get("cifar_stem", False),
            **meta.get("timm_kwargs", {}),
        )
    except (
        RuntimeError,
        TypeError,
        ValueError,
    ) as error:  # timm: unknown model name, arguments it does not take
        raise BackboneError(
            f"cannot create the backbone {meta['model_name']!r} with timm_kwargs {meta.get('timm_kwargs', {})}: "
            f"{type(error).__name__}: {error}"
        ) from None
    if state is not None:
        state = (
            {k: v for k, v in state.items() if not k.startswith(("fc.", "head.fc.", "classifier."))}
            if not meta.get("cifar_stem")
            else state
        )
        load_weights_into(
            backbone,
            state,
            source,
            f"{meta['model_name']} (cifar_stem={meta.get('cifar_stem', False)})",
        )
    info = {
        "model_name": meta["model_name"],
        "source": "random-init" if random_init else (source or "timm default init"),
        "sha256": file_digest(Path(source)) if source else None,
        "image_size": meta.get("image_size"),
    }
    return backbone, info

"""The training configuration: one typed dataclass; YAML presets in configs/ set its fields, and every
field is also a command-line flag of the same spelling (``--batch_size 4096``).

Everything here is checked before any GPU work: unknown keys, wrong types and impossible values fail
with a message that names the field (and the file it came from)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


@dataclass
class TrainConfig:
    # --- data
    train_shards: str = ""  # directory, brace pattern, glob or comma list of WebDataset shards
    image_size: int = 224
    augment: str = "imagenet"  # augmentation preset: imagenet (paper defaults) | cifar (32 px, s=0.5, no blur)
    jitter_strength: float = -1.0  # colour jitter strength s; -1 = the preset's (1.0 imagenet, 0.5 cifar)
    blur_prob: float = -1.0  # Gaussian blur probability; -1 = the preset's (0.5 imagenet, 0 cifar)
    min_crop_area: float = 0.08  # random resized crop area range [min_crop_area, 1]
    shuffle_buffer: int = 4096  # DALI reader shuffle buffer (samples)
    data_threads: int = 0  # DALI CPU threads per process; 0 = this process's share of the cores
    prefetch: int = 2  # DALI prefetch queue depth (batches)
    data_device: str = "auto"  # where DALI decodes and augments: auto (gpu when training on CUDA) | gpu | cpu
    data_loader: str = "dali"  # dali | torchvision (the baseline, for time-to-accuracy comparisons; resume not exact)
    # --- model
    backbone: str = "resnet50"  # any timm model name
    cifar_stem: bool = False  # 3x3 stride-1 stem, no max-pool (ResNet family; CIFAR recipe)
    timm_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments, e.g. {"channels": [32, 64, 128, 256]}
    proj_hidden: int = 0  # projection head hidden width; 0 = the backbone's feature width
    proj_dim: int = 128
    # --- optimisation (the paper's defaults)
    batch_size: int = 4096  # global batch (all processes together)
    epochs: float = 100
    max_steps: int = 0  # stop after this many steps (0 = run all epochs); the schedule still spans all epochs
    max_train_minutes: float = 0  # stop once this much training wall-clock has passed (0 = off; evaluation excluded); schedule as above
    optimizer: str = "lars"  # any timm optimiser name (lars, sgd, adamw, ...)
    lr: float = 0.3  # base learning rate, scaled by lr_scaling
    lr_scaling: str = "linear"  # linear: lr * batch/256 | sqrt: lr * sqrt(batch) | none
    warmup_epochs: float = 10
    weight_decay: float = 1e-6  # not applied to biases and normalisation parameters (nor LARS adaptation)
    momentum: float = 0.9
    temperature: float = 0.1
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    # --- system
    precision: str = "bf16"  # no | bf16 | fp16 (Accelerate mixed precision; use "no" on CPU)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    sync_bn: bool = True  # global batch norm across processes (the paper's "global BN")
    loss_backend: str = "auto"  # NT-Xent backend: auto (fused Triton on CUDA) | triton | chunked
    seed: int = 0
    # --- output
    output_dir: str = "runs/simclr"
    resume: str = ""  # "" (fresh start) | auto (newest checkpoint in output_dir, if any) | PATH of a checkpoint
    checkpoint_every: int = 1000  # steps; 0 = only at the end (and on preemption)
    keep_checkpoints: int = 3
    log_every: int = 20  # steps between meter updates (also when preemption and non-finite loss are checked)
    tracker: str = "tensorboard"  # tensorboard | wandb | none
    # --- evaluation during training (kNN + fast linear probe on frozen features)
    eval_every_epochs: float = 0  # 0 = off
    eval_train_shards: str = ""
    eval_val_shards: str = ""
    eval_size: int = 0  # eval image side; 0 = image_size
    eval_resize: int = 0  # shorter side before the centre crop; 0 = eval_size / 0.875 (= eval_size when eval_size <= 64)
    eval_json: str = ""  # append each evaluation to this JSON file (a curve)

    CHOICES: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "augment": ("imagenet", "cifar"),
        "lr_scaling": ("linear", "sqrt", "none"),
        "precision": ("no", "bf16", "fp16"),
        "data_device": ("auto", "gpu", "cpu"),
        "data_loader": ("dali", "torchvision"),
        "loss_backend": ("auto", "triton", "chunked"),
        "tracker": ("tensorboard", "wandb", "none"),
    }

    def validate(self, world_size: int = 1) -> None:
        """Checks that need no data: choices, ranges, divisibility. Raises ConfigError naming the field."""
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        if not self.train_shards:
            raise ConfigError("train_shards is required (a shard directory, brace pattern or glob)")
        positive = ["image_size", "batch_size", "proj_dim", "prefetch", "shuffle_buffer", "keep_checkpoints", "log_every"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ["epochs", "lr", "temperature"]:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        non_negative = ["warmup_epochs", "weight_decay", "momentum", "grad_clip", "max_steps", "max_train_minutes", "checkpoint_every", "eval_every_epochs",
                        "data_threads", "proj_hidden"]
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_epochs >= self.epochs and self.epochs > 0:
            raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        if not 0 < self.min_crop_area <= 1:
            raise ConfigError(f"min_crop_area must be in (0, 1], got {self.min_crop_area}")
        if self.temperature < 0.03:
            raise ConfigError(f"temperature must be >= 0.03, got {self.temperature}")
        if self.batch_size % world_size:
            raise ConfigError(f"batch_size {self.batch_size} is not divisible by the number of processes ({world_size})")
        if self.batch_size // world_size < 2:
            raise ConfigError(f"batch_size {self.batch_size} gives fewer than 2 samples per process ({world_size} processes); batch norm needs >= 2")
        if self.eval_every_epochs and not (self.eval_train_shards and self.eval_val_shards):
            raise ConfigError("eval_every_epochs needs eval_train_shards and eval_val_shards")

    @property
    def scaled_lr(self) -> float:
        if self.lr_scaling == "linear":
            return self.lr * self.batch_size / 256
        if self.lr_scaling == "sqrt":
            return self.lr * self.batch_size**0.5
        return self.lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(name: str, value, annotation: str):
    """Check/convert ``value`` to the field's declared type (annotations are strings here)."""
    kind = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}[annotation]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{name} must be a JSON object, got {value!r} ({error})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and kind is not str:
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{name} must be {annotation}, got {value!r}") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{name} must be {annotation}, got {value!r} ({type(value).__name__})")
    return value


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (optional) and overrides (e.g. from the command line)."""
    values: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of field: value")
        for key in loaded:
            if key not in FIELDS:
                raise ConfigError(f"unknown config key {key!r} in {path}")
        values.update({key: _coerce(key, value, FIELDS[key].type) for key, value in loaded.items()})
    for key, value in (overrides or {}).items():
        if key not in FIELDS:
            raise ConfigError(f"unknown config key {key!r}")
        values[key] = _coerce(key, value, FIELDS[key].type)
    return TrainConfig(**values)


def parse_args(argv: list[str] | None = None, description: str = "") -> TrainConfig:
    """``--config FILE`` plus ``--FIELD VALUE`` for every TrainConfig field."""
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help="YAML preset (configs/*.yaml); flags override it")
    for name, spec in FIELDS.items():
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        parser.add_argument(f"--{name}", type=str, metavar=spec.type.upper(), help=f"(default {default!r})")
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    return load_config(config_path, args)


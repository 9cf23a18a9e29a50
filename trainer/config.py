"""The training configuration: one typed dataclass. YAML presets in configs/ set its fields, and every field is
also a command-line flag of the same spelling (``--batch_size 4096``; ``--batch-size`` works too).

Parsing is jsonargparse's (YAML files, types, ``Literal`` choices, ``None`` for "unset", JSON for mappings),
and ``--help`` shows every field with the docstring written under it here. Everything is checked before
any GPU work: unknown keys, wrong types and impossible values fail with a one-line message that names
the field (and the file it came from)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from jsonargparse.typing import PositiveInt, restricted_number_type

from ..common.cli import config_files, parse_dataclass, underscore_flags
from ..common.errors import SimclrError
from ..common.timm_args import check_timm_kwargs
from ..model.settings import MODEL_FIELDS
from ..pipeline.augment_config import PRESETS, AugmentConfig
from ..pipeline.shards.shardset import MAX_IMAGE_PIXELS

# a field's range, declared with the field: the parser refuses a value outside it, naming the field
FinitePositiveFloat = restricted_number_type(
    "FinitePositiveFloat", float, [(">", 0), ("<", math.inf)], join="and"
)
FiniteNonNegativeFloat = restricted_number_type(
    "FiniteNonNegativeFloat", float, [(">=", 0), ("<", math.inf)], join="and"
)
RANGED = (PositiveInt, FinitePositiveFloat, FiniteNonNegativeFloat)


class ConfigError(SimclrError, ValueError):
    """A bad configuration value; the message names the field."""


@dataclass
class LoaderConfig:
    """The training loader: DALI's reader and threads, or the torchvision baseline."""

    shuffle_buffer: PositiveInt = 4096
    """Samples in DALI's reader shuffle buffer."""
    threads: PositiveInt | None = None
    """DALI CPU threads per process; null = this process's share of the cores."""
    prefetch: PositiveInt = 2
    """DALI prefetch queue depth, in batches."""
    device: Literal["auto", "gpu", "cpu"] = "auto"
    """Where DALI decodes and augments: auto = the GPU when training on CUDA."""
    kind: Literal["dali", "torchvision"] = "dali"
    """dali, or the torchvision DataLoader baseline (time-to-accuracy comparisons; its resume is not exact)."""
    hw_decoder_load: FiniteNonNegativeFloat = 0.65
    """Share of the images the GPU decoder sends to the hardware JPEG decoder (A100/H100; the rest are decoded
    by nvJPEG's hybrid path, Huffman on DALI's CPU threads). 0.65: NVIDIA's ResNet-50 example; in [0, 1]."""
    shard_cache_mb: PositiveInt = 1024
    """Shards in object storage (s3://): memory per process for whole shards fetched ahead of the loader, MiB."""
    shard_fetches: PositiveInt = 4
    """Shards in object storage (s3://): concurrent whole-shard GETs per DALI pipeline."""
    max_image_pixels: PositiveInt = MAX_IMAGE_PIXELS
    """The most pixels a training or evaluation image may have (read from its header before DALI decodes it):
    a larger one is refused naming its shard and key. Default: the cap simclr-shards write and verify apply."""


@dataclass
class ModelConfig:
    """The encoder f (a timm backbone) and the projection head g (model/simclr.py)."""

    backbone: str = "resnet50"
    """Any timm model name (the encoder f; its classifier is removed)."""
    pretrained: bool = False
    """Start from timm's pretrained weights for the backbone (downloaded by timm) instead of a random init."""
    cifar_stem: bool = False
    """Replace a ResNet stem by a 3x3 stride-1 conv without max-pool (the paper's CIFAR recipe)."""
    timm_kwargs: dict = field(default_factory=dict)
    """Extra timm.create_model arguments, as a mapping, e.g. {"channels": [32, 64, 128, 256]}."""
    proj_hidden: PositiveInt | None = None
    """Hidden width of the projection head; null = the backbone's feature width."""
    proj_dim: PositiveInt = 128
    """Output width of the projection head (the loss's d)."""
    proj_layers: PositiveInt = 2
    """Linear layers of the projection head: 2 as the first paper, 3 as SimCLRv2 (each but the last with BN + ReLU)."""


@dataclass
class TrainConfig:
    """SimCLR pretraining; the defaults are the paper's ImageNet recipe (Chen et al. 2020)."""

    # --- data
    train_shards: str = ""
    """Training shards: a directory, brace pattern, glob or comma list of WebDataset tars (required)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """The SimCLR view (pipeline/augment_config.py): its preset, size, crop, colour jitter and blur, each a flag
    of its own (``--augment.size 32``, ``--augment.preset cifar``; the flat ``--image_size``, ``--augment cifar``,
    ``--jitter_strength``, ... of earlier versions are aliases)."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    """How the training images are read (``--loader.threads 4``; the flat ``--data_threads``, ``--prefetch``,
    ... of earlier versions are aliases)."""
    # --- model
    model: ModelConfig = field(default_factory=ModelConfig)
    """The encoder and projection head (``--model.backbone resnet18``; the flat ``--backbone``, ``--proj_dim``,
    ... of earlier versions are aliases)."""
    # --- optimisation (the paper's defaults)
    batch_size: PositiveInt = 4096
    """Global batch: images per step over all processes together (each process gets batch_size / processes)."""
    micro_batch: int | Literal["auto"] | None = None
    """Gradient caching (batches larger than memory): at most this many images per view go through the model
    with autograd at a time, per process; null or 0 = off (the whole local batch at once); auto = the largest
    that fits the GPU, probed once at the first step (CUDA only). The loss and its gradient still see all 2N
    views of every process (exact, Gao et al. 2021) for about 1.3x the compute (a second forward). Batch norm
    then normalises each micro-batch on its own ("ghost" BN: statistics over its 2M views, across processes
    with sync_bn), and running statistics are updated once per step with the micro-batches' mean statistics."""
    epochs: FinitePositiveFloat = 100
    """Length of the schedule, in epochs."""
    max_steps: PositiveInt | None = None
    """Stop after this many steps; null = run all epochs (the schedule still spans all epochs)."""
    max_train_minutes: FinitePositiveFloat | None = None
    """Stop once this much training wall-clock has passed (evaluation excluded); null = no limit."""
    optimizer: str = "lars"
    """Any timm optimiser name (lars, sgd, adamw, ...)."""
    lr: FinitePositiveFloat = 0.3
    """Base learning rate, scaled by lr_scaling."""
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    """linear: lr x batch_size / 256; sqrt: lr x sqrt(batch_size); none: lr as given."""
    warmup_epochs: FiniteNonNegativeFloat = 10
    """Linear warm-up from 0, then cosine decay to 0."""
    weight_decay: FiniteNonNegativeFloat = 1e-6
    """Not applied to biases and normalisation parameters (nor LARS adaptation)."""
    momentum: FiniteNonNegativeFloat = 0.9
    """Optimiser momentum."""
    temperature: FinitePositiveFloat = 0.1
    """NT-Xent temperature tau."""
    loss: Literal["ntxent", "supcon"] = "ntxent"
    """ntxent (SimCLR's loss) or supcon (supervised contrastive, Khosla et al. 2020: every view of the same label is a
    positive; needs labelled shards, .cls per sample)."""
    grad_clip: FinitePositiveFloat | None = None
    """Clip the global gradient norm to this; null = no clipping."""
    # --- system
    precision: Literal["no", "bf16", "fp16"] = "bf16"
    """Accelerate mixed precision (use no on the CPU)."""
    channels_last: bool = True
    """Channels-last memory format for the model and its inputs."""
    compile: bool = False
    """torch.compile the model."""
    sync_bn: bool = True
    """Global batch norm across processes (the paper's global BN)."""
    loss_backend: Literal["auto", "triton", "chunked"] = "auto"
    """NT-Xent backend: auto = the fused Triton kernels on CUDA, the chunked PyTorch path elsewhere."""
    loss_float32_matmul_precision: Literal["ieee", "tf32"] = "ieee"
    """How the fused loss multiplies float32 projections: ieee = exact float32, tf32 = tensor cores (~1e-3 relative
    error, an estimate until measured on a GPU). bf16/fp16 projections (under bf16/fp16 precision) always use them."""
    seed: int = 0
    """Seed of the initial weights, the data order and the augmentations."""
    # --- output
    output_dir: str = "runs/simclr"
    """Checkpoints, logs, the exported backbone."""
    resume: str | None = None
    """auto (this run's newest verified checkpoint in output_dir, if any) or a checkpoint directory; null = a fresh
    start (refused where output_dir holds another run: pass --resume auto to continue it or --overwrite)."""
    overwrite: bool = False
    """Start a new run in an output_dir that holds another run, deleting that run's checkpoints."""
    allow_world_size_change: bool = False
    """Resume with another number of processes (the data order then restarts at the current epoch's beginning)."""
    checkpoint_every: PositiveInt | None = 1000
    """Steps between checkpoints; null = only at the end (and on preemption, bad data and before evaluations)."""
    checkpoint_every_minutes: FinitePositiveFloat | None = None
    """Also checkpoint once this many minutes have passed since the last checkpoint; null = no clock."""
    keep_checkpoints: PositiveInt = 3
    """Newest checkpoints of this run kept (the one just written is never deleted)."""
    log_every: PositiveInt = 20
    """Steps between meter updates and the non-finite loss/parameter check (preemption is checked every step)."""
    tracker: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """Where the meters go besides the progress bar."""
    tracker_project: str | None = None
    """The tracker's project: W&B's project (null = $WANDB_PROJECT, else simclr), TensorBoard's log directory
    under output_dir (null = simclr)."""
    tracker_run_name: str | None = None
    """W&B's display name of the run; null = W&B's own (the run id stays this run's id either way)."""
    tracker_tags: list[str] = field(default_factory=list)
    """W&B tags of the run."""
    tracker_entity: str | None = None
    """W&B entity (user or team) the run goes to; null = $WANDB_ENTITY, else your default entity."""
    tracker_init_kwargs: dict = field(default_factory=dict)
    """More keyword arguments for the tracker's init (wandb.init, TensorBoard's SummaryWriter), e.g.
    {"group": "sweep-3", "notes": "..."}; they override the fields above."""
    progress: bool = True
    """The progress bar on stderr; false for log files: each log_every step's meters are printed as a line."""
    # --- evaluation during training (kNN + fast linear probe on frozen features)
    eval_every_epochs: FinitePositiveFloat | None = None
    """Evaluate every this many epochs (and at step 0 and the end); null = no evaluation during training."""
    eval_train_shards: str | None = None
    """Labelled shards the kNN / linear probe fits on."""
    eval_val_shards: str | None = None
    """Labelled shards the probe is scored on."""
    eval_size: PositiveInt | None = None
    """Evaluation image side; null = image_size."""
    eval_resize: PositiveInt | None = None
    """Shorter side before the centre crop; null = eval_size / 0.875 (eval_size itself at <= 64 px)."""
    eval_knn_k: PositiveInt = 200
    """Neighbours of the in-training kNN probe."""
    eval_knn_temperature: FinitePositiveFloat = 0.1
    """Temperature of the in-training kNN probe's weights."""
    eval_json: str | None = None
    """Write the evaluation curve (every evaluation so far) to this JSON file."""
    online_probe: bool = True
    """A linear classifier on the detached backbone features trained in each step (its own SGD), its running top-1 in
    the log, progress bar and tracker; only where the training shards carry labels (off, said once, otherwise)."""
    online_probe_lr: FinitePositiveFloat = 0.1
    """Learning rate of the online probe's SGD (momentum 0.9, no weight decay), constant."""

    def check(self) -> None:
        """The checks that need neither data, nor the world size, nor torch (the parser runs them, so a bad value
        is refused before anything heavy is imported): a field's own range is its type's (``PositiveInt``, ...),
        checked here as well for configs built without the parser; the rest relates fields to each other.
        Raises ``ConfigError`` naming the field."""
        for name, problem in [
            *typed_field_problems(self),
            *typed_field_problems(self.loader, "loader."),
            *typed_field_problems(self.model, "model."),
        ]:
            raise ConfigError(f"{name} {problem}")
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(
                f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})"
            )
        if (
            self.micro_batch != "auto"
            and self.micro_batch is not None
            and not self.micro_batch >= 0
        ):
            raise ConfigError(
                f"micro_batch must be >= 0 (0 = off), null or auto, got {self.micro_batch}"
            )
        if self.eval_every_epochs and not (self.eval_train_shards and self.eval_val_shards):
            raise ConfigError("eval_every_epochs needs eval_train_shards and eval_val_shards")
        if self.resume is not None and not self.resume:
            raise ConfigError(
                "resume must be auto, a checkpoint directory, or null (a fresh start); got an empty string"
            )
        if not self.loader.hw_decoder_load <= 1.0:
            raise ConfigError(
                f"loader.hw_decoder_load must be in [0, 1], got {self.loader.hw_decoder_load}"
            )
        if self.loss == "supcon" and self.loader.kind != "dali":
            raise ConfigError(
                "loss supcon reads labels through the DALI loader: use --loader.kind dali"
            )
        try:
            check_timm_kwargs(self.model.timm_kwargs, "model.timm_kwargs")
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def validate(self, world_size: int = 1) -> None:
        """All checks that need no data: ``check``, the required shards, and what depends on the world size or
        on torch (the loss's smallest temperature, CUDA for micro_batch auto). Raises ``ConfigError``."""
        if not self.train_shards:
            raise ConfigError("train_shards is required (a shard directory, brace pattern or glob)")
        self.check()
        check_shard_locations(self)
        from ..model.ntxent import (
            MIN_TEMPERATURE,
        )  # here: the parser (and --help) stays free of torch

        if self.temperature < MIN_TEMPERATURE:
            raise ConfigError(
                f"temperature must be >= {MIN_TEMPERATURE} (the loss's fixed shift 1/tau keeps float32 exponentials "
                f"normal down to there), got {self.temperature}"
            )
        if self.batch_size % world_size:
            raise ConfigError(
                f"batch_size {self.batch_size} is not divisible by the number of processes ({world_size})"
            )
        if self.batch_size // world_size < 2:
            raise ConfigError(
                f"batch_size {self.batch_size} gives fewer than 2 samples per process ({world_size} "
                "processes); batch norm needs >= 2"
            )
        if self.micro_batch == "auto":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(
                    "micro_batch auto probes GPU memory and needs CUDA (none here); give a number of "
                    "images per view, e.g. --micro_batch 256, or 0 for off"
                )

    @property
    def scaled_lr(self) -> float:
        if self.lr_scaling == "linear":
            return self.lr * self.batch_size / 256
        if self.lr_scaling == "sqrt":
            return self.lr * self.batch_size**0.5
        return self.lr

    def to_dict(self) -> dict:
        """Plain JSON data (nested sections as mappings, tuples as lists): what checkpoints and config.yaml hold."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def tracker_config(self) -> dict:
        """The scalar fields by their flag names (``augment.size``), for a tracker's run config."""
        return {k: v for k, v in _flat(self.to_dict()).items() if not isinstance(v, (dict, list))}

    def to_yaml(self) -> str:
        """The resolved configuration as YAML that ``--config`` reads back."""
        stream = io.StringIO()
        yaml.safe_dump(self.to_dict(), stream, sort_keys=False)
        return stream.getvalue()


def typed_field_problems(config, prefix: str = "") -> typing.Iterator[tuple[str, str]]:
    """(field, what is wrong) for every value of ``config`` outside its field's ranged type (``RANGED``)."""
    for name, hint in typing.get_type_hints(type(config)).items():
        ranged = [t for t in typing.get_args(hint) or (hint,) if t in RANGED]
        value = getattr(config, name)
        if ranged and value is not None:
            try:
                ranged[0](value)
            except (ValueError, TypeError) as error:
                yield (
                    prefix + name,
                    f"must be {str(error).split('restriction ', 1)[-1]}, got {value}",
                )


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def check_shard_locations(cfg: TrainConfig) -> None:
    """Well-formed ``s3://`` shard locations (object storage: pipeline/shards/s3.py)."""
    from ..pipeline.shards.s3 import check_shard_location
    from ..pipeline.shards.shardset import ShardError

    for name in ("train_shards", "eval_train_shards", "eval_val_shards"):
        try:
            check_shard_location(getattr(cfg, name) or "")
        except ShardError as error:
            raise ConfigError(f"{name}: {error}") from None


# Fields a resumed run may change: they decide what is done next, not what the saved state means. Any other
# field (the data, its augmentations and order, the model, the optimiser and its schedule, precision) that
# differs from the checkpoint's refuses the resume; a field added later is refused until it is listed here.
SAFE_ON_RESUME = frozenset(
    {
        "epochs",
        "max_steps",
        "max_train_minutes",
        "output_dir",
        "resume",
        "overwrite",
        "allow_world_size_change",
        "checkpoint_every",
        "checkpoint_every_minutes",
        "keep_checkpoints",
        "log_every",
        "loader.shard_cache_mb",
        "loader.shard_fetches",
        "tracker",
        "tracker_project",
        "tracker_run_name",
        "tracker_tags",
        "tracker_entity",
        "tracker_init_kwargs",
        "progress",
        "eval_every_epochs",
        "eval_train_shards",
        "eval_val_shards",
        "eval_size",
        "eval_resize",
        "eval_knn_k",
        "eval_knn_temperature",
        "eval_json",
        "loader.threads",
        "loader.prefetch",
        "loader.hw_decoder_load",
        "compile",
        "channels_last",
        "loss_backend",
        "loss_float32_matmul_precision",
        "online_probe",  # issue 31: a meter, not the trained model
        "online_probe_lr",
    }
)


# --- the flat spellings of earlier versions (YAML files, checkpoints' configs, flags): the view's fields moved
# into the ``augment`` section. ``augment: cifar`` (a preset name) is ``augment.preset``; ``min_crop_area`` the
# low end of ``augment.crop_area``.
MOVED = {
    "image_size": "augment.size",
    "jitter_strength": "augment.jitter_strength",
    "blur_prob": "augment.blur_prob",
    "contrast_per_channel": "augment.contrast_per_channel",
    "brightness_impl": "augment.brightness_impl",
    "crop_sampler": "augment.crop_sampler",
    "roi_decode": "augment.roi_decode",
    "blur_padding": "augment.blur_padding",
    "shuffle_buffer": "loader.shuffle_buffer",
    "data_threads": "loader.threads",
    "prefetch": "loader.prefetch",
    "data_device": "loader.device",
    "data_loader": "loader.kind",
    **{name: f"model.{name}" for name in MODEL_FIELDS},
}
SECTIONS = {"augment": AugmentConfig, "loader": LoaderConfig, "model": ModelConfig}


def migrate(values: dict) -> dict:
    """``values`` (a config mapping of any version) with the flat fields of earlier versions moved into their
    sections (``MOVED``); a mapping already in today's form is returned as it is."""
    values = dict(values)
    if isinstance(values.get("augment"), str):  # the preset's name
        values["augment"] = {"preset": values["augment"]}
    sections = {name: dict(values[name] or {}) for name in SECTIONS if name in values}
    for old, new in MOVED.items():
        if old in values:
            section, name = new.split(".")
            sections.setdefault(section, {})[name] = values.pop(old)
    if "min_crop_area" in values:
        sections.setdefault("augment", {})["crop_area"] = [values.pop("min_crop_area"), 1.0]
    return {**values, **sections}


def _section_from(name: str, section: dict, base=None):
    """Section ``name``'s dataclass from a mapping over ``base`` (for augment, a new preset drops the base's
    preset values)."""
    cls = SECTIONS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(section) - known):
        raise ConfigError(
            f"unknown {name} key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    values = dataclasses.asdict(base) if base is not None else {}
    if name == "augment" and "preset" in section:
        values.pop("jitter_strength", None), values.pop("blur_prob", None)
    try:
        return cls(**{**values, **section})
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from None


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from a mapping of any version (a checkpoint's config, a run's config.yaml): migrated, keys
    it does not know (fields removed since) left out, the ones it lacks at their defaults."""
    plain = json.loads(
        json.dumps(migrate(values))
    )  # the parser's ranged ints and floats as plain ones (DALI)
    values = {k: v for k, v in plain.items() if k in FIELDS}
    for name in SECTIONS.keys() & values.keys():
        values[name] = _section_from(name, values[name])
    return TrainConfig(**values)


def _flat(values: dict, prefix: str = "") -> dict:
    """{"augment": {"size": 32}} -> {"augment.size": 32}: a nested config's fields by their dotted flag names."""
    flat = {}
    for name, value in values.items():
        if name in SECTIONS and isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _comparable(value):
    return yaml.safe_load(
        yaml.safe_dump(value, sort_keys=False)
    )  # tuples -> lists, as in the checkpoint's JSON


def resume_changes(saved: dict, config: TrainConfig) -> tuple[list[str], list[str]]:
    """(changes that are applied, changes that refuse the resume) between a checkpoint's config (of any
    version: migrated first) and ``config``, each as "field: old -> new". A field the checkpoint predates counts
    as its default."""
    old_values = _flat(_comparable(config_from_dict(saved).to_dict()))
    new_values = _flat(_comparable(config.to_dict()))
    applied, refused = [], []
    for name, new in new_values.items():
        if name in (
            "resume",
            "overwrite",
            "allow_world_size_change",
        ):  # how to start, not what to run
            continue
        if old_values.get(name) != new:
            safe = name in SAFE_ON_RESUME or name.split(".")[0] in SAFE_ON_RESUME
            (applied if safe else refused).append(f"{name}: {old_values.get(name)!r} -> {new!r}")
    return applied, refused


ALIASED = frozenset({*MOVED, "min_crop_area", "augment", "config"})


def flat_aliases(argv: list[str]) -> list[str]:
    """``argv`` with earlier versions' flat flags in today's nested spelling (``--image_size 32`` ->
    ``--augment.size 32``, ``--augment cifar`` -> ``--augment.preset cifar``) and a ``--config`` file of an earlier
    version replaced by its migrated YAML text."""
    out, position = [], 0
    while position < len(argv):
        arg, position = argv[position], position + 1
        name, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name not in ALIASED or not sep and position >= len(argv):
            out.append(
                arg
            )  # not an alias, or a flag without its value: the parser names the problem
            continue
        if not sep:
            value, position = argv[position], position + 1
        out += _alias(name, value)
    return out


def _alias(name: str, value: str) -> list[str]:
    if name == "config":
        return ["--config", _migrated_file(value)]
    if name == "augment":
        return (
            ["--augment", value] if value.lstrip().startswith("{") else ["--augment.preset", value]
        )
    if name == "min_crop_area":
        return ["--augment.crop_area", f"[{value}, 1.0]"]
    return [f"--{MOVED[name]}", value]


def _migrated_file(path: str) -> str:
    """``path`` for a config file in today's form (or one that does not read: the parser names it), else the
    migrated YAML text of an earlier version's file (the parser takes either)."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return path
    if not isinstance(values, dict) or migrate(values) == values:
        return path
    return yaml.safe_dump(migrate(values), sort_keys=False)


def parse_args(argv: list[str] | None = None, description: str = "") -> TrainConfig:
    """A TrainConfig from the command line (``--config FILE`` and flags, today's or an earlier version's
    spelling); ``--help`` prints and exits. Raises ``ConfigError`` with a one-line message naming the field
    (and the config file)."""
    import sys

    argv = underscore_flags(sys.argv[1:] if argv is None else argv)
    files = config_files(argv)
    preset_fields = {
        f"augment.{name}": None for name in PRESETS["imagenet"]
    }  # null: the chosen preset's
    values = parse_dataclass(
        TrainConfig, flat_aliases(argv), "train.py", description, ConfigError, files, preset_fields
    )
    config = config_from_dict(values)
    config.check()
    return config


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (optional) and overrides given as Python values, in today's or an earlier
    version's spelling (tests, benchmarks)."""
    config = parse_args(["--config", str(path)] if path else [])
    overrides = migrate(overrides or {})
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}")
    for name in SECTIONS.keys() & overrides.keys():
        if isinstance(overrides[name], dict):
            overrides[name] = _section_from(name, overrides[name], getattr(config, name))
    return dataclasses.replace(config, **overrides)

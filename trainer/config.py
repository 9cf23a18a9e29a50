"""The training configuration: one typed dataclass. YAML presets in configs/ set its fields, and every field is
also a command-line flag of the same spelling (``--batch_size 4096``; ``--batch-size`` works too).

Parsing is jsonargparse's (YAML files, types, ``Literal`` choices, ``None`` for "unset", JSON for mappings),
and ``--help`` shows every field with the docstring written under it here. Everything is checked before
any GPU work: unknown keys, wrong types and impossible values fail with a one-line message that names
the field (and the file it came from)."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, set_parsing_settings

from ..common.cli import underscore_flags
from ..common.timm_args import check_timm_kwargs

set_parsing_settings(docstring_parse_attribute_docstrings=True)


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


@dataclass
class TrainConfig:
    """SimCLR pretraining; the defaults are the paper's ImageNet recipe (Chen et al. 2020)."""

    # --- data
    train_shards: str = ""
    """Training shards: a directory, brace pattern, glob or comma list of WebDataset tars (required)."""
    image_size: int = 224
    """Side of each augmented view, in pixels."""
    augment: Literal["imagenet", "cifar"] = "imagenet"
    """Augmentation preset: imagenet (the paper's: jitter strength 1, blur p=0.5) or cifar (strength 0.5, no blur)."""
    jitter_strength: float | None = None
    """Colour jitter strength s; null = the preset's (1.0 imagenet, 0.5 cifar)."""
    blur_prob: float | None = None
    """Gaussian blur probability per view; null = the preset's (0.5 imagenet, 0 cifar)."""
    contrast_per_channel: bool = True
    """Colour jitter's contrast pivots on each channel's own mean (TensorFlow's adjust_contrast, the official code);
    false: on one mean over all channels (torchvision's)."""
    brightness_impl: Literal["simclrv2", "simclrv1"] = "simclrv2"
    """Colour jitter's brightness, the official code's impl flag: simclrv2 (its default) multiplies by a factor in
    [1 - 0.8 s, 1 + 0.8 s]; simclrv1 adds a delta in [-0.8 s, 0.8 s] (tf.image.adjust_brightness, values in [0, 1])."""
    min_crop_area: float = 0.08
    """Random resized crop: the smallest crop, as a fraction of the image's area (the range is [this, 1])."""
    crop_sampler: Literal["tf", "uniform_area"] = "tf"
    """tf: the official code's tf.image.sample_distorted_bounding_box (integer height drawn uniformly,
    min_object_covered 0.1, whole image as fallback); uniform_area: DALI's random_resized_crop (area uniform, aspect
    log-uniform: the paper's text, torchvision's)."""
    roi_decode: bool = False
    """Decode only each view's crop region (two partial decodes per image) instead of the whole image once."""
    blur_padding: Literal["zero", "reflect"] = "zero"
    """Gaussian blur borders: zero (the official gaussian_blur's SAME padding) or reflect (reflect-101)."""
    shuffle_buffer: int = 4096
    """Samples in DALI's reader shuffle buffer."""
    data_threads: int | None = None
    """DALI CPU threads per process; null = this process's share of the cores."""
    prefetch: int = 2
    """DALI prefetch queue depth, in batches."""
    data_device: Literal["auto", "gpu", "cpu"] = "auto"
    """Where DALI decodes and augments: auto = the GPU when training on CUDA."""
    data_loader: Literal["dali", "torchvision"] = "dali"
    """dali, or the torchvision DataLoader baseline (time-to-accuracy comparisons; its resume is not exact)."""
    # --- issue 28 ---
    shard_cache_mb: int = 1024
    """Shards in object storage (s3://): memory per process for whole shards fetched ahead of the loader, MiB."""
    shard_fetches: int = 4
    """Shards in object storage (s3://): concurrent whole-shard GETs per DALI pipeline."""
    # --- model
    backbone: str = "resnet50"
    """Any timm model name (the encoder f; its classifier is removed)."""
    pretrained: bool = False
    """Start from timm's pretrained weights for the backbone (downloaded by timm) instead of a random init."""
    cifar_stem: bool = False
    """Replace a ResNet stem by a 3x3 stride-1 conv without max-pool (the paper's CIFAR recipe)."""
    timm_kwargs: dict = field(default_factory=dict)
    """Extra timm.create_model arguments, as a mapping, e.g. {"channels": [32, 64, 128, 256]}."""
    proj_hidden: int | None = None
    """Hidden width of the projection head; null = the backbone's feature width."""
    proj_dim: int = 128
    """Output width of the projection head (the loss's d)."""
    # --- optimisation (the paper's defaults)
    batch_size: int = 4096
    """Global batch: images per step over all processes together (each process gets batch_size / processes)."""
    micro_batch: int | Literal["auto"] | None = None
    """Gradient caching (batches larger than memory): at most this many images per view go through the model
    with autograd at a time, per process; null or 0 = off (the whole local batch at once); auto = the largest
    that fits the GPU, probed once at the first step (CUDA only). The loss and its gradient still see all 2N
    views of every process (exact, Gao et al. 2021) for about 1.3x the compute (a second forward). Batch norm
    then normalises each micro-batch on its own ("ghost" BN: statistics over its 2M views, across processes
    with sync_bn), and running statistics are updated once per step with the micro-batches' mean statistics."""
    epochs: float = 100
    """Length of the schedule, in epochs."""
    max_steps: int | None = None
    """Stop after this many steps; null = run all epochs (the schedule still spans all epochs)."""
    max_train_minutes: float | None = None
    """Stop once this much training wall-clock has passed (evaluation excluded); null = no limit."""
    optimizer: str = "lars"
    """Any timm optimiser name (lars, sgd, adamw, ...)."""
    lr: float = 0.3
    """Base learning rate, scaled by lr_scaling."""
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    """linear: lr x batch_size / 256; sqrt: lr x sqrt(batch_size); none: lr as given."""
    warmup_epochs: float = 10
    """Linear warm-up from 0, then cosine decay to 0."""
    weight_decay: float = 1e-6
    """Not applied to biases and normalisation parameters (nor LARS adaptation)."""
    momentum: float = 0.9
    """Optimiser momentum."""
    temperature: float = 0.1
    """NT-Xent temperature tau."""
    grad_clip: float | None = None
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
    checkpoint_every: int | None = 1000
    """Steps between checkpoints; null = only at the end (and on preemption, bad data and before evaluations)."""
    checkpoint_every_minutes: float | None = None
    """Also checkpoint once this many minutes have passed since the last checkpoint; null = no clock."""
    keep_checkpoints: int = 3
    """Newest checkpoints of this run kept (the one just written is never deleted)."""
    log_every: int = 20
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
    eval_every_epochs: float | None = None
    """Evaluate every this many epochs (and at step 0 and the end); null = no evaluation during training."""
    eval_train_shards: str | None = None
    """Labelled shards the kNN / linear probe fits on."""
    eval_val_shards: str | None = None
    """Labelled shards the probe is scored on."""
    eval_size: int | None = None
    """Evaluation image side; null = image_size."""
    eval_resize: int | None = None
    """Shorter side before the centre crop; null = eval_size / 0.875 (eval_size itself at <= 64 px)."""
    eval_knn_k: int = 200
    """Neighbours of the in-training kNN probe."""
    eval_knn_temperature: float = 0.1
    """Temperature of the in-training kNN probe's weights."""
    eval_json: str | None = None
    """Write the evaluation curve (every evaluation so far) to this JSON file."""

    def validate(self, world_size: int = 1) -> None:
        """Checks that need no data: ranges and divisibility (types and choices are the parser's). Raises
        ``ConfigError`` naming the field."""
        if not self.train_shards:
            raise ConfigError("train_shards is required (a shard directory, brace pattern or glob)")
        # --- issue 28 ---
        check_remote_settings(self)
        positive = [
            "image_size",
            "batch_size",
            "proj_dim",
            "prefetch",
            "shuffle_buffer",
            "keep_checkpoints",
            "log_every",
            "epochs",
            "lr",
            "temperature",
            "eval_knn_k",
            "eval_knn_temperature",
            "data_threads",
            "proj_hidden",
            "max_steps",
            "max_train_minutes",
            "checkpoint_every",
            "checkpoint_every_minutes",
            "eval_every_epochs",
            "eval_size",
            "eval_resize",
            "grad_clip",
        ]
        for name in positive:
            value = getattr(self, name)
            if value is not None and not value > 0:  # `not >` also catches nan
                raise ConfigError(f"{name} must be > 0, got {value}")
        for name in ["warmup_epochs", "weight_decay", "momentum"]:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in [
            "epochs",
            "warmup_epochs",
            "lr",
            "max_train_minutes",
            "eval_every_epochs",
            "checkpoint_every_minutes",
            "weight_decay",
            "momentum",
            "temperature",
            "min_crop_area",
            "grad_clip",
            "eval_knn_temperature",
        ]:
            value = getattr(self, name)
            if value is not None and value == float("inf"):
                raise ConfigError(f"{name} must be finite, got {value}")
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        if not 0 < self.min_crop_area <= 1:
            raise ConfigError(f"min_crop_area must be in (0, 1], got {self.min_crop_area}")
        for name in ["jitter_strength", "blur_prob"]:
            value = getattr(self, name)
            if value is not None and not 0 <= value <= (1 if name == "blur_prob" else 10):
                raise ConfigError(f"{name} must be in [0, {1 if name == 'blur_prob' else 10}], got {value}")
        from ..model.ntxent import MIN_TEMPERATURE  # here: the parser (and --help) stays free of torch

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
        elif self.micro_batch is not None and not self.micro_batch >= 0:
            raise ConfigError(f"micro_batch must be >= 0 (0 = off), null or auto, got {self.micro_batch}")
        if self.eval_every_epochs and not (self.eval_train_shards and self.eval_val_shards):
            raise ConfigError("eval_every_epochs needs eval_train_shards and eval_val_shards")
        if self.resume is not None and not self.resume:
            raise ConfigError(
                "resume must be auto, a checkpoint directory, or null (a fresh start); got an empty string"
            )
        try:
            check_timm_kwargs(self.timm_kwargs, "timm_kwargs")
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @property
    def scaled_lr(self) -> float:
        if self.lr_scaling == "linear":
            return self.lr * self.batch_size / 256
        if self.lr_scaling == "sqrt":
            return self.lr * self.batch_size**0.5
        return self.lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved configuration as YAML that ``--config`` reads back."""
        stream = io.StringIO()
        yaml.safe_dump(self.to_dict(), stream, sort_keys=False)
        return stream.getvalue()


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def check_remote_settings(cfg: TrainConfig) -> None:
    """Issue 28: well-formed ``s3://`` shard locations and a positive cache and fetch count."""
    from ..pipeline.shards.s3 import check_shard_location
    from ..pipeline.shards.shardset import ShardError

    for name in ("train_shards", "eval_train_shards", "eval_val_shards"):
        try:
            check_shard_location(getattr(cfg, name) or "")
        except ShardError as error:
            raise ConfigError(f"{name}: {error}") from None
    for name in ("shard_cache_mb", "shard_fetches"):
        if not getattr(cfg, name) >= 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")


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
        "shard_cache_mb",
        "shard_fetches",
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
        "data_threads",
        "prefetch",
        "compile",
        "channels_last",
        "loss_backend",
        "loss_float32_matmul_precision",
    }
)


def _comparable(value):
    return yaml.safe_load(yaml.safe_dump(value))  # tuples -> lists, as the checkpoint's JSON holds them


def resume_changes(saved: dict, config: TrainConfig) -> tuple[list[str], list[str]]:
    """(changes that are applied, changes that refuse the resume) between a checkpoint's config and ``config``,
    each as "field: old -> new". A field the checkpoint predates counts as its default."""
    applied, refused = [], []
    for name, spec in FIELDS.items():
        if name in ("resume", "overwrite", "allow_world_size_change"):  # how to start, not what to run
            continue
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        old, new = _comparable(saved.get(name, default)), _comparable(getattr(config, name))
        if old != new:
            (applied if name in SAFE_ON_RESUME else refused).append(f"{name}: {old!r} -> {new!r}")
    return applied, refused


def build_parser(description: str = "") -> ArgumentParser:
    """``--config FILE`` plus ``--FIELD VALUE`` for every TrainConfig field (jsonargparse)."""
    parser = ArgumentParser(
        prog="train.py", description=description, exit_on_error=False, env_prefix=None, default_env=False
    )
    parser.add_argument(
        "--config", action=ActionConfigFile, help="YAML preset (configs/*.yaml); flags after it override it"
    )
    parser.add_class_arguments(TrainConfig, as_group=False)
    return parser


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def parse_args(argv: list[str] | None = None, description: str = "") -> TrainConfig:
    """A TrainConfig from the command line (``--config FILE`` and flags); ``--help`` prints and exits.
    Raises ``ConfigError`` with a one-line message naming the field (and the config file)."""
    import sys

    argv = underscore_flags(sys.argv[1:] if argv is None else argv)
    parser = build_parser(description)
    try:
        namespace = parser.parse_args(argv)
    except ArgumentError as error:
        files = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
        files += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
        where = f" (config {', '.join(files)} and flags)" if files else ""
        raise ConfigError(_one_line(error) + where) from None
    values = namespace.as_dict()
    values.pop("config", None)
    return TrainConfig(**values)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (optional) and overrides given as Python values (tests, benchmarks)."""
    argv = ["--config", str(path)] if path else []
    config = parse_args(argv)
    unknown = sorted(set(overrides or {}) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}")
    return dataclasses.replace(config, **(overrides or {}))

"""evaluate.py's configuration: one typed dataclass, parsed by the helper train.py's uses
(common/cli.py:parse_dataclass): every field is a flag of the same spelling (``--train_shards``; ``--train-shards``
works too), ``--config FILE`` reads a YAML file of them, ``--print_config`` prints the resolved configuration, and
booleans are written ``--augment true``.

``--k`` also takes a comma list (``--k 10,20,200``, as well as ``--k [10,20,200]`` and ``k: [10, 20, 200]`` in a
file). Light on purpose (no torch): ``--help`` answers in about a second."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Literal

from ..common.cli import parse_dataclass, underscore_flags
from ..common.errors import SimclrError

PROTOCOLS = ("knn", "linear", "finetune", "distill")


class UsageError(SimclrError, ValueError):
    """A bad command-line or config value; the message names the flag."""


@dataclass
class EvalConfig:
    """Evaluate a backbone with the paper's protocols on labelled WebDataset shards."""

    # --- what to evaluate
    checkpoint: str | None = None
    """train.py output dir, a checkpoint dir (checkpoints/step_*), or an exported .safetensors (its architecture
    from the JSON beside it or the file's metadata)."""
    model: str | None = None
    """timm model name (with --weights, or alone for timm's init; overrides the checkpoint's)."""
    weights: str | None = None
    """Weights file for --model (.safetensors or torch state dict)."""
    random_init: bool = False
    """Evaluate the same architecture with random weights (a baseline)."""
    compare_random_init: bool = False
    """Also evaluate the same architecture at random initialisation, as a second row."""
    # --- on what
    train_shards: str = ""
    """Labelled shards the kNN index / linear head / fine-tuning fit on: a directory, brace pattern, glob or comma
    list of WebDataset tars (required)."""
    val_shards: str = ""
    """Labelled shards every protocol is scored on (the whole set; required)."""
    protocol: str = "knn"
    """knn, linear, finetune, or a comma list (knn,linear); all = knn,linear."""
    image_size: int | None = None
    """Evaluation image side; null = the checkpoint's training size (else 224)."""
    resize: int | None = None
    """Shorter side before the centre crop; null = image_size / 0.875 (image_size itself at <= 64 px)."""
    local_batch_size: int = 256
    """Images per batch per process (the global batch is this x processes)."""
    precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast for the backbone's forward."""
    seed: int = 0
    """Head initialisation, data order, augmentations and the label subset."""
    features_cache: str | None = None
    """Directory to save the frozen features in and reload them from (checked against the weights and data)."""
    # --- knn
    k: list[int] = field(default_factory=lambda: [200])
    """Neighbours; several evaluate in one pass: --k 10,20,200."""
    knn_temperature: float = 0.1
    """Temperature of the kNN vote's weights exp(similarity / T)."""
    # --- linear
    augment: bool = False
    """Linear: the paper's mode (a random resized crop + flip every epoch) instead of cached centre-crop features."""
    epochs: int | None = None
    """Linear epochs; null = 100 on cached features, 90 with --augment true."""
    lr: float = 0.1
    """Linear base lr, scaled by global batch / 256."""
    min_crop_area: float = 0.08
    """Linear with --augment true: the random resized crop's smallest area fraction."""
    # --- finetune
    label_fraction: float | None = None
    """Finetune: the labelled fraction of train_shards; null = 0.01."""
    subset_file: str | None = None
    """Finetune: JSON of sample keys per class; read if it exists, else written (a .txt is read as --subset_list)."""
    subset_list: str | None = None
    """Finetune: text file of image file names, one per line (the official SimCLR 1%/10% ImageNet lists), matched
    against the shards' stored source paths; must exist."""
    finetune_epochs: int | None = None
    """Finetune epochs; null = 60 for <= 1% labels, 30 above."""
    finetune_lr: float = 0.05
    """Fine-tuning base lr, scaled by global batch / 256."""
    # --- issue 31: SimCLRv2 (fine-tuning from inside the head, self-distillation)
    ft_proj_selector: int = 0
    """Evaluate the backbone followed by the first J layers of the pretrained projection head (SimCLRv2: 1 with its
    3-layer head); 0 = the backbone alone. Needs --checkpoint with the head (a train.py run, export or checkpoint)."""
    distill_shards: str | None = None
    """Distill: the unlabelled shards the student learns from (labels, if any, unused); null = train_shards."""
    distill_epochs: int = 10
    """Distill: epochs of the student over distill_shards."""
    distill_lr: float = 0.1
    """Distill: the student's base lr (SGD Nesterov, cosine), scaled by global batch / 256."""
    distill_temperature: float = 1.0
    """Distill: temperature tau of the teacher's and student's softmax (the paper's 1)."""
    # --- output
    json: str | None = None
    """Write the report (settings, data, versions, every backbone's metrics) to this JSON file."""

    def validate(self) -> None:
        """Checks the parser's types cannot express; raises ``UsageError`` naming the flag."""
        for name in ("train_shards", "val_shards"):
            if not getattr(self, name):
                raise UsageError(
                    f"--{name} is required (a shard directory, brace pattern, glob or comma list)"
                )
        for name in ("image_size", "resize", "local_batch_size", "epochs", "finetune_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be >= 1, got {value}")
        if not self.k or min(self.k) < 1:
            raise UsageError(f"--k must be integers >= 1, got {self.k}")
        if self.label_fraction is not None and not 0 < self.label_fraction <= 1:
            raise UsageError(f"--label_fraction must be in (0, 1], got {self.label_fraction}")
        if not 0 < self.min_crop_area <= 1:
            raise UsageError(f"--min_crop_area must be in (0, 1], got {self.min_crop_area}")
        self.protocols()
        if self.ft_proj_selector < 0:  # issue 31
            raise UsageError(
                f"--ft_proj_selector must be >= 0 (0 = the backbone), got {self.ft_proj_selector}"
            )
        for name in ("distill_epochs", "distill_lr", "distill_temperature"):
            if not getattr(self, name) > 0 or getattr(self, name) == float("inf"):
                raise UsageError(f"--{name} must be > 0 and finite, got {getattr(self, name)}")
        if "distill" in self.protocols() and "finetune" not in self.protocols():
            raise UsageError(
                "--protocol distill distils the fine-tuned teacher: use --protocol finetune,distill"
            )

    def protocols(self) -> list[str]:
        """The requested protocols in a fixed order (knn, linear, finetune, distill)."""
        requested = (
            ["knn", "linear"]
            if self.protocol == "all"
            else [p.strip() for p in self.protocol.split(",")]
        )
        requested = [p for p in requested if p]
        unknown = [p for p in requested if p not in PROTOCOLS]
        if unknown or not requested:
            raise UsageError(
                f"--protocol: unknown protocol(s) {unknown or [self.protocol]}; choose from {', '.join(PROTOCOLS)}, all"
            )
        return [p for p in PROTOCOLS if p in requested]


_COMMA_INTEGERS = re.compile(r"\s*-?\d+(\s*,\s*-?\d+)*\s*")


def _comma_lists(argv: list[str]) -> list[str]:
    """``--k 10,20`` / ``--k=10,20`` -> ``--k [10,20]``: the comma list the flag has always taken, as a YAML list."""
    out = []
    for position, arg in enumerate(argv):
        if arg.startswith("--k=") and _COMMA_INTEGERS.fullmatch(arg[4:]):
            arg = f"--k=[{arg[4:]}]"
        elif position and argv[position - 1] == "--k" and _COMMA_INTEGERS.fullmatch(arg):
            arg = f"[{arg}]"
        out.append(arg)
    return out


def parse_args(argv: list[str] | None = None, description: str = "") -> EvalConfig:
    """An EvalConfig from the command line (``--config FILE`` and flags), validated; ``--help`` and
    ``--print_config`` print and exit. Raises ``UsageError`` with a one-line message naming the flag."""
    argv = _comma_lists(underscore_flags(sys.argv[1:] if argv is None else argv))
    config = EvalConfig(**parse_dataclass(EvalConfig, argv, "evaluate.py", description, UsageError))
    config.validate()
    return config

"""The model's settings in a training config, for readers of saved configs (checkpoints, exports) that must not
import the trainer: the keys, and the one lookup that takes a config of any version."""

from __future__ import annotations

# trainer/config.py's ModelConfig declares them (a test keeps the two equal); configs of earlier versions held
# them at the top level, today's in the ``model`` section.
MODEL_FIELDS = (
    "backbone",
    "pretrained",
    "cifar_stem",
    "timm_kwargs",
    "proj_hidden",
    "proj_dim",
    "proj_layers",
)


def model_settings(config: dict) -> dict:
    """The model's settings of a training config mapping of any version: its ``model`` section, or the flat keys
    of a config written before the section existed (what is missing: the reader's defaults)."""
    section = config.get("model")
    if isinstance(section, dict):
        return section
    return {name: config[name] for name in MODEL_FIELDS if name in config}

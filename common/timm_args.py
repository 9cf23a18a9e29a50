"""Which ``timm.create_model`` keyword arguments a configuration or an exported backbone may carry.

``timm_kwargs`` travel in files (a config YAML, ``backbone.json``, a safetensors header, a checkpoint's
``trainer_state.json``) that may come from someone else. Only arguments that shape the architecture are
accepted, as JSON values; arguments that say where weights come from (``pretrained_cfg_overlay``,
``checkpoint_path``, ...) or that the project sets itself (``num_classes``) are refused by name."""

from __future__ import annotations

ARCHITECTURE_ARGS = frozenset(
    {
        # any family
        "in_chans",
        "global_pool",
        "drop_rate",
        "drop_path_rate",
        "drop_block_rate",
        "act_layer",
        "norm_layer",
        "output_stride",
        "zero_init_last",
        "weight_init",
        "img_size",
        # ResNet / ResNeXt / ResNet-D
        "layers",
        "channels",
        "cardinality",
        "base_width",
        "stem_width",
        "stem_type",
        "replace_stem_pool",
        "block_reduce_first",
        "down_kernel_size",
        "avg_down",
        # ViT and relatives
        "patch_size",
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
        "qkv_bias",
        "qk_norm",
        "init_values",
        "class_token",
        "no_embed_class",
        "reg_tokens",
        "pre_norm",
        "fc_norm",
        "dynamic_img_size",
        "dynamic_img_pad",
        "pos_embed",
        "patch_drop_rate",
        "proj_drop_rate",
        "attn_drop_rate",
        "window_size",
        # ConvNeXt, EfficientNet, RegNet, ...
        "depths",
        "dims",
        "ls_init_value",
        "conv_mlp",
        "conv_bias",
        "head_norm_first",
        "kernel_sizes",
        "channel_multiplier",
        "depth_multiplier",
        "fix_stem",
        "stem_kernel_size",
        "stem_stride",
        "width_multiplier",
    }
)
REFUSED = {
    "num_classes": "the project sets it (0: the classifier is removed)",
    "pretrained": "use the pretrained option, not timm_kwargs",
    "pretrained_cfg": "it says where weights come from",
    "pretrained_cfg_overlay": "it says where weights come from",
    "pretrained_strict": "it says how weights are loaded",
    "checkpoint_path": "it loads a file",
    "cache_dir": "it says where weights come from",
    "features_only": "the project needs the pooled features",
    "out_indices": "the project needs the pooled features",
}


def _is_json_value(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_is_json_value(v) for v in value)


def check_timm_kwargs(kwargs, where: str = "timm_kwargs") -> dict:
    """``kwargs`` if every key is an architecture argument with a JSON value; else ``ValueError`` naming the
    key and ``where`` it came from (a flag, a field or a file)."""
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"{where}: expected a mapping of timm arguments, got {type(kwargs).__name__}"
        )
    for key, value in kwargs.items():
        if key in REFUSED:
            raise ValueError(f"{where}: {key!r} is not accepted in timm_kwargs ({REFUSED[key]})")
        if key not in ARCHITECTURE_ARGS:
            raise ValueError(
                f"{where}: {key!r} is not an architecture argument this project passes to timm "
                f"(the accepted ones are listed in common/timm_args.py)"
            )
        if not _is_json_value(value):
            raise ValueError(
                f"{where}: {key} must be a number, string, boolean or list of them, got {type(value).__name__}"
            )
    return dict(kwargs)

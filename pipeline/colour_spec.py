"""What a view's colour stage computes, shared by its two forms (``colour_cpu``: Numba inside DALI on the CPU;
``colour_gpu``: a Triton kernel on the GPU) and by ``augment``, which draws the uniforms: the layout of a view's
vector of uniforms, the ranges they are scaled to, TF's grayscale weights and the packed parameter vector."""

from __future__ import annotations

import numpy as np

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale's

# What each element of a view's draws (the last ones of ``view_plan.ViewPlan.uniform``, after the crop's seed)
# decides: the coins, the ranges, then the jitter's order (its four ops run in increasing order of their keys: iid
# uniforms, so every order of the four is equally likely, as the official ``tf.random.shuffle(tf.range(4))``).
COINS = ("jitter", "gray", "flip", "blur")
ORDER_KEYS = ("order_brightness", "order_contrast", "order_saturation", "order_hue")
UNIFORMS = (*COINS, "brightness", "contrast", "saturation", "hue", "sigma", *ORDER_KEYS)

# Where each draw sits in a view's uniforms (compile-time constants for Numba and Triton)
U_JITTER, U_GRAY, U_FLIP = (UNIFORMS.index(name) for name in ("jitter", "gray", "flip"))
U_BRIGHTNESS = UNIFORMS.index("brightness")  # then contrast, saturation, hue: the ops 0..3
U_ORDER = UNIFORMS.index("order_brightness")  # the four order keys, same op order
assert UNIFORMS[U_BRIGHTNESS : U_BRIGHTNESS + 4] == ("brightness", "contrast", "saturation", "hue")
assert UNIFORMS[U_ORDER : U_ORDER + 4] == (
    "order_brightness",
    "order_contrast",
    "order_saturation",
    "order_hue",
)
P_PER_CHANNEL, P_ADDITIVE = 11, 12  # the two switches' places in colour_params


def jitter_ranges(cfg) -> dict[str, tuple[float, float]]:
    """The (low, high) range of each drawn value of a view (``cfg``: an ``augment.AugmentConfig``), as the official
    code draws them: the brightness factor ``[1 - 0.8 s, 1 + 0.8 s]`` (not below 0; simclrv1: the additive
    ``delta`` in ``[-0.8 s, 0.8 s]``), the contrast and saturation factors ``[1 - 0.8 s, 1 + 0.8 s]`` (not below
    0: TF rejects negative bounds), the hue shift in turns ``[-0.2 s, 0.2 s]`` and the blur's sigma."""
    s = cfg.jitter_strength
    factor = lambda amount: (max(0.0, 1.0 - amount * s), 1.0 + amount * s)
    additive = cfg.brightness_impl == "simclrv1"
    return {
        "brightness": (-cfg.brightness * s, cfg.brightness * s)
        if additive
        else factor(cfg.brightness),
        "contrast": factor(cfg.contrast),
        "saturation": factor(cfg.saturation),
        "hue": (-cfg.hue * s, cfg.hue * s),
        "sigma": cfg.blur_sigma,
    }


def colour_params(cfg) -> np.ndarray:
    """The colour stage's parameters for ``cfg`` (an ``augment.AugmentConfig``): probabilities of the jitter,
    grayscale and flip; (low, span) of brightness, contrast, saturation and hue (turns); 1 for a per-channel
    contrast pivot (else 0: one mean over all channels); 1 for additive brightness (simclrv1)."""
    ranges = jitter_ranges(cfg)
    values = [cfg.jitter_prob, cfg.gray_prob, cfg.flip_prob]
    for name in ("brightness", "contrast", "saturation", "hue"):
        lo, hi = ranges[name]
        values += [lo, hi - lo]
    values += [
        1.0 if cfg.contrast_per_channel else 0.0,
        1.0 if cfg.brightness_impl == "simclrv1" else 0.0,
    ]
    return np.array(values, np.float32)

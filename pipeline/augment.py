"""SimCLR augmentations as DALI graph fragments: one definition for the ``cpu`` and ``gpu`` backends.

A view is ``crop -> flip -> colour jitter (p) -> grayscale (p) -> blur (p) -> normalise``, with the
parameters of the official SimCLR code (``AugmentConfig``). The functions here take and return DALI
``DataNode`` s and must be called inside a DALI pipeline definition built with
``enable_conditionals=True``: the random choices are per-sample ``if`` statements, so a sample only
pays for the operators it goes through.

How the colour jitter maps onto DALI's operators (measured choices, see bench/results and the README):
- the four adjustments are one affine colour map per image, ``y = b c H x + b (1 - c) H m`` (``colour_map``):
  brightness b and contrast c about each channel's own mean m (TF's ``adjust_contrast`` in the official code;
  ``contrast_per_channel=False`` pivots on one mean over all channels, torchvision's rule), saturation and hue
  as ``H``, the matrix of DALI's ``hsv`` operator (its linear YIQ approximation of HSV). Without clipping in
  between, the adjustments commute exactly (the mean of ``H x`` is ``H m``), so the official code's random
  order needs no branch; what is not kept is its clipping to the valid range after each adjustment: values
  are saturated once, at the end. Against clipping between brightness-contrast and saturation-hue (this
  project's previous two passes) that moves 0.8% of CIFAR-10's pixel values by more than 2 levels at the
  CIFAR strength s = 0.5 (2.3% at s = 1; mean 0.3 and 0.5 levels). One ``coord_transform`` pass on the CPU
  instead of a mean, a brightness-contrast pass, an ``hsv`` pass and a branch per order.
- grayscale is ``color_space_conversion`` RGB -> GRAY -> RGB (luma 0.299/0.587/0.114: a fixed-point
  kernel ~50x cheaper on the CPU than ``hsv`` with saturation 0, which it matches to +-1 level).
- the blur kernel is truncated at 4 sigma (capped at the paper's window, 23 taps at 224 px): the
  weights left out are < 1e-4 of the kernel's mass, and a sigma of 0.1 no longer pays for 23 taps.
  On the CPU it is two 1-D ``fn.filter`` passes with the same per-sample Gaussian (DALI's CPU
  ``gaussian_blur`` is 5-9x slower for the same result); the blurred view goes to the normalisation
  unrounded (float). On the GPU it stays ``gaussian_blur``.
- every random number of a view but its crop's comes from one DALI random operator (``ViewDraws``): on the
  CPU each operator costs about a microsecond per sample however little it computes.
- on the CPU the whole colour stage (jitter, grayscale and the flip) is one compiled operator
  (``colour_cpu``, DALI's ``numba_function``) computing the same map from the same uniforms: built from
  DALI's operators (the form the GPU runs, ``colour_stage``) it is ~45 operators per view, which at 32 px
  cost more than the pixels (measured: +50% images/s at 32 px, +19% at 224 px on 2 cores).
Images are uint8 HWC between operators; the flip commutes with every colour operator: on the GPU it is
fused into the final normalisation, on the CPU into the compiled colour stage.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.data_node import DataNode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of one SimCLR view. Defaults are the paper's ImageNet settings (Chen et al. 2020, App. A)."""

    size: int = 224
    crop_area: tuple[float, float] = (0.08, 1.0)  # fraction of the source image's area
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)  # width / height, sampled log-uniformly
    crop_attempts: int = 100  # then fall back to a centre crop
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    jitter_strength: float = 1.0  # s: scales the four ranges below
    brightness: float = 0.8  # factor in [1 - 0.8 s, 1 + 0.8 s]
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2  # shift in [-0.2 s, 0.2 s] of the colour wheel
    gray_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    contrast_per_channel: bool = (
        True  # pivot on each channel's mean (TF's adjust_contrast); False: one mean over all channels
    )
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def cifar(cls, size: int = 32, **overrides) -> AugmentConfig:
        """The paper's CIFAR-10 preset (App. B.9): 32 px, jitter strength 0.5, no blur."""
        return cls(**{"size": size, "jitter_strength": 0.5, "blur_prob": 0.0, **overrides})

    @property
    def blur_window(self) -> int:
        """Odd kernel side of ~10% of the image side, as in the official code (23 at 224 px)."""
        return 2 * (self.size // 20) + 1

    def __post_init__(self):
        for name in ("flip_prob", "jitter_prob", "gray_prob", "blur_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {value}")
        if self.size < 8:
            raise ValueError(f"AugmentConfig.size must be >= 8 pixels, got {self.size}")
        lo, hi = self.crop_area
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"AugmentConfig.crop_area must satisfy 0 < lo <= hi <= 1, got {self.crop_area}")


# The share of images the mixed decoder sends to the hardware JPEG decoder (A100/H100), as in NVIDIA's
# ResNet-50 DALI example. Its buffer paddings are per DALI thread (one device buffer and one pinned host
# buffer each), so they are sized to the data (``gpu_decoder_sizing``), not to ImageNet's largest image.
GPU_DECODER = {"hw_decoder_load": 0.65}
DALI_DEFAULT_HOST_PADDING = 8 * 2**20  # DALI's default host_memory_padding (device: 16 MiB)
_GPU_DECODER_SIZING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("gpu_decoder_sizing", default=None)


def gpu_decoder_sizing(largest_image: tuple[int, int] | None) -> dict:
    """nvJPEG's preallocation for data whose largest image is (width, height): DALI's defaults where they
    already hold it decoded (8 MiB of pinned host, 16 MiB of device memory per thread: CIFAR's 32 px, photos up
    to ~2.8 megapixels), else one decoded RGB image (rounded up to MiB) per buffer and the size hints (ImageNet's
    largest, 5,980 x 6,430: 111 MiB). Unknown: the defaults. A larger image only costs a reallocation."""
    if largest_image is None:
        return {}
    width, height = largest_image
    decoded = width * height * 3
    if decoded <= DALI_DEFAULT_HOST_PADDING:
        return {}
    padding = -(-decoded // 2**20) * 2**20
    return {
        "device_memory_padding": padding,
        "host_memory_padding": padding,
        "preallocate_width_hint": width,
        "preallocate_height_hint": height,
    }


@contextlib.contextmanager
def gpu_decoder_sized_for(largest_image: tuple[int, int] | None) -> Iterator[dict]:
    """While a pipeline's graph is defined inside: its GPU decoders get ``gpu_decoder_sizing(largest_image)``."""
    sizing = gpu_decoder_sizing(largest_image)
    token = _GPU_DECODER_SIZING.set(sizing)
    try:
        yield sizing
    finally:
        _GPU_DECODER_SIZING.reset(token)


def _decoder_args(device: str) -> dict:
    if device != "gpu":
        return {"device": "cpu"}
    return {"device": "mixed", **GPU_DECODER, **(_GPU_DECODER_SIZING.get() or {})}


def decode(jpegs, device: str):
    """JPEG bytes -> uint8 RGB HWC. ``device='gpu'`` uses DALI's "mixed" decoder (nvJPEG, with the
    hardware JPEG decoder where the GPU has one); ``'cpu'`` uses libjpeg-turbo."""
    return fn.decoders.image(jpegs, output_type=types.RGB, **_decoder_args(device))


def decode_random_crop(jpegs, cfg: AugmentConfig, device: str):
    """JPEG bytes -> the random resized crop of ``simclr_view`` (same area/aspect sampling), decoding only
    the crop's region (ROI decode: DALI's ``decoders.image_random_crop``), uint8 RGB HWC of side ``cfg.size``."""
    region = fn.decoders.image_random_crop(
        jpegs,
        output_type=types.RGB,
        random_area=list(cfg.crop_area),
        random_aspect_ratio=list(cfg.crop_aspect),
        num_attempts=cfg.crop_attempts,
        **_decoder_args(device),
    )
    return fn.resize(region, size=[cfg.size, cfg.size], interp_type=types.INTERP_CUBIC, antialias=False)


# DALI's ``hsv`` operator as a matrix (dali/operators/image/color/hsv.h): to YIQ, rotate the chroma (I, Q) by
# the hue angle and scale it by the saturation, back to RGB with DALI's own (rounded) inverse. Written out,
# ``H(s, h) = HSV_BASIS[0] + s cos(h) HSV_BASIS[1] + s sin(h) HSV_BASIS[2]``.
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
YIQ_TO_RGB = np.array([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.107, 1.705]])
HSV_BASIS = (
    np.outer(YIQ_TO_RGB[:, 0], RGB_TO_YIQ[0]),
    np.outer(YIQ_TO_RGB[:, 1], RGB_TO_YIQ[1]) + np.outer(YIQ_TO_RGB[:, 2], RGB_TO_YIQ[2]),
    np.outer(YIQ_TO_RGB[:, 1], RGB_TO_YIQ[2]) - np.outer(YIQ_TO_RGB[:, 2], RGB_TO_YIQ[1]),
)


def _constant(value) -> DataNode:
    """A constant for DALI arithmetic as a 1-element (or n-element) array: on the CPU an arithmetic operator
    with a 0-d constant operand costs ~0.8 us per sample, with an array operand ~0.1 us (measured, DALI 2.4)."""
    return types.Constant(np.atleast_1d(np.asarray(value, np.float32)))


def _as_node(value) -> DataNode:
    return value if isinstance(value, DataNode) else _constant(value)


def hsv_matrix(saturation, hue_degrees) -> DataNode:
    """The 3x3 RGB map of DALI's ``hsv(saturation, hue)``, per sample (saturation and hue: DALI scalars or numbers)."""
    radians = _as_node(hue_degrees) * _constant(np.pi / 180.0)
    saturation = _as_node(saturation)
    k0, k1, k2 = (_constant(k) for k in HSV_BASIS)
    return k0 + (saturation * dmath.cos(radians)) * k1 + (saturation * dmath.sin(radians)) * k2


def jitter_matrices(brightness, contrast, saturation, hue_degrees) -> tuple[DataNode, DataNode]:
    """The colour jitter's affine map as two 3x3 matrices per sample: ``scale = b c H`` (applied to the pixels)
    and ``offset = b (1 - c) H`` (applied to the contrast pivot), ``H`` DALI's ``hsv`` matrix."""
    hsv, brightness, contrast = hsv_matrix(saturation, hue_degrees), _as_node(brightness), _as_node(contrast)
    return hsv * (brightness * contrast), hsv * (brightness * (_constant(1.0) - contrast))


def colour_map(images, scale, offset, per_channel: bool = True):
    """The colour jitter as one affine map per image, saturated to uint8 once:
    ``y = H (b (m + c (x - m))) = scale x + offset m`` (``jitter_matrices``), with ``m`` each channel's mean
    (TF's ``adjust_contrast``) or, with ``per_channel=False``, the mean over all channels.

    Brightness-and-contrast and saturation-and-hue commute exactly when nothing is clipped between them (the
    pivot, a mean, moves with the linear map: the mean of ``H x`` is ``H m``), so the official code's random
    order of the adjustments needs no branch: only its clipping after each adjustment is not kept (values
    are saturated once, after all four). On the CPU one ``coord_transform`` pass (``M = scale``,
    ``T = offset m``); on the GPU the translation is GPU data and DALI's named arguments must live on the
    CPU, so it is added by arithmetic on the device (``colour_map_by_arithmetic`` forces that form, for tests)."""
    pivot = fn.reductions.mean(images, axes=[0, 1], keep_dims=True)  # (1, 1, 3)
    if not per_channel:
        pivot = fn.reductions.mean(pivot, axes=[2], keep_dims=True) * _constant(np.ones(3))
    translation = fn.coord_transform(pivot, M=offset)  # (1, 1, 3)
    if images.device == "gpu" or colour_map_by_arithmetic:
        mapped = fn.coord_transform(images, M=scale, dtype=types.FLOAT)
        return fn.cast(dmath.clamp(mapped + translation, 0, 255), dtype=types.UINT8)
    return fn.coord_transform(images, M=scale, T=fn.reshape(translation, shape=[3]), dtype=types.UINT8)


colour_map_by_arithmetic = False
# On the CPU the colour stage (jitter, grayscale, flip) is one compiled operator (``colour_cpu``); True builds
# it from DALI's operators there too, as on the GPU (for tests: the GPU's form checked on the CPU).
colour_by_dali_operators = False


def jitter_ranges(cfg: AugmentConfig) -> dict[str, tuple[float, float]]:
    """The (low, high) range of each drawn value of a view: the jitter's brightness, contrast and saturation
    factors (``[1 - amount s, 1 + amount s]``, not below 0), its hue shift in degrees and the blur's sigma."""
    s = cfg.jitter_strength
    factor = lambda amount: (max(0.0, 1.0 - amount * s), 1.0 + amount * s)
    return {
        "brightness": factor(cfg.brightness),
        "contrast": factor(cfg.contrast),
        "saturation": factor(cfg.saturation),
        "hue": (-cfg.hue * s * 360.0, cfg.hue * s * 360.0),
        "sigma": cfg.blur_sigma,
    }


# What each element of a view's vector of uniforms (``ViewDraws.uniform``) decides: the coins, then the ranges.
UNIFORMS = ("jitter", "gray", "flip", "blur", "brightness", "contrast", "saturation", "hue", "sigma")


class ViewDraws:
    """Every random number of one view after its crop, drawn by one DALI operator: on the CPU each DALI
    operator costs about a microsecond per sample however little it computes (a 32 px colour pass, tens), so
    one vector of uniforms, scaled to each range, replaces an operator per number. Attributes: the coins
    ``jitter``, ``gray``, ``flip``, ``blur`` (booleans, ``u < p``) and ``brightness``, ``contrast``,
    ``saturation``, ``hue`` (degrees), ``sigma`` (floats)."""

    def __init__(self, cfg: AugmentConfig, uniform: DataNode | None = None):
        coins = {"jitter": cfg.jitter_prob, "gray": cfg.gray_prob, "flip": cfg.flip_prob, "blur": cfg.blur_prob}
        ranges = jitter_ranges(cfg)
        assert (*coins, *ranges) == UNIFORMS
        if uniform is None:  # (tests pass their own)
            uniform = fn.random.uniform(range=[0.0, 1.0], shape=[len(UNIFORMS)])
        self.uniform = uniform  # the raw vector, as the CPU's compiled colour stage reads it
        heads = uniform < _constant([*coins.values(), *[0.0] * len(ranges)])
        values = (
            _constant([0.0] * len(coins) + [lo for lo, _ in ranges.values()])
            + _constant([1.0] * len(coins) + [hi - lo for lo, hi in ranges.values()]) * uniform
        )
        for i, name in enumerate(coins):
            setattr(self, name, heads[i])
        for i, name in enumerate(ranges, start=len(coins)):
            setattr(self, name, values[i])


def color_jitter(images, cfg: AugmentConfig, draws: ViewDraws):
    """The official ``color_jitter_rand``: brightness and contrast factors in [1 - 0.8 s, 1 + 0.8 s]
    (multiplicative; contrast pivots on the mean), saturation likewise, hue shifted by up to 0.2 s of
    the colour wheel, as one affine colour map (``colour_map``)."""
    scale, offset = jitter_matrices(draws.brightness, draws.contrast, draws.saturation, draws.hue)
    return colour_map(images, scale, offset, cfg.contrast_per_channel)


def grayscale(images):
    """Luma (0.299 R + 0.587 G + 0.114 B) in all three channels."""
    gray = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    return fn.color_space_conversion(gray, image_type=types.GRAY, output_type=types.RGB)


def _blur_radius(sigma, cfg: AugmentConfig):
    """The blur kernel's radius for ``sigma``: ceil(4 sigma), capped at the paper's window."""
    return dmath.min(fn.cast(dmath.ceil(sigma * 4.0), dtype=types.INT32), cfg.blur_window // 2)


def gaussian_blur_cpu(images, sigma, radius, max_window: int):
    """Separable Gaussian blur as two ``fn.filter`` passes with reflect-101 borders (as ``gaussian_blur``):
    per-sample kernel exp(-x^2 / 2 sigma^2), x in [-radius, radius], normalised. uint8 HWC -> float HWC
    (0..255, not rounded)."""
    r = max_window // 2
    x = types.Constant(np.arange(-r, r + 1, dtype=np.float32))
    weights = dmath.exp(x * x * (-0.5 / (sigma * sigma)))
    weights = fn.slice(
        weights,
        fn.cast(r - radius, dtype=types.FLOAT),
        fn.cast(2 * radius + 1, dtype=types.FLOAT),
        axes=[0],
        normalized_anchor=False,
        normalized_shape=False,
    )
    weights = weights / fn.reductions.sum(weights)
    taps = 2 * radius + 1
    horizontal = fn.filter(images, fn.reshape(weights, shape=fn.stack(1, taps)), dtype=types.FLOAT)
    return fn.filter(horizontal, fn.reshape(weights, shape=fn.stack(taps, 1)))


def simclr_view(images, cfg: AugmentConfig, output_dtype=types.FLOAT):
    """One augmented view of decoded uint8 HWC ``images`` -> normalised ``output_dtype`` HWC of side ``cfg.size``."""
    view = fn.random_resized_crop(
        images,
        size=[cfg.size, cfg.size],
        random_area=list(cfg.crop_area),
        random_aspect_ratio=list(cfg.crop_aspect),
        num_attempts=cfg.crop_attempts,
        interp_type=types.INTERP_CUBIC,
        antialias=False,  # as the official code's tf.image.resize (bicubic, no antialiasing)
    )
    return augment_cropped(view, cfg, output_dtype)


def colour_stage(view, cfg: AugmentConfig, draws: ViewDraws):
    """Colour jitter (p), grayscale (p) and the flip (p) of uint8 HWC views -> (views, mirror). The flip
    commutes with every colour operator: on the CPU the compiled stage (``colour_cpu``) writes the pixels
    mirrored and ``mirror`` is 0; with DALI's operators (the GPU) ``mirror`` is the per-sample coin, for
    the final normalisation to apply."""
    if view.device == "cpu" and not colour_by_dali_operators:
        from .colour_cpu import compiled_colour_stage

        return compiled_colour_stage(view, draws.uniform, cfg), 0
    if cfg.jitter_prob > 0 and draws.jitter:
        view = color_jitter(view, cfg, draws)
    if cfg.gray_prob > 0 and draws.gray:
        view = grayscale(view)
    return view, fn.cast(draws.flip, dtype=types.INT32)


def augment_cropped(view, cfg: AugmentConfig, output_dtype=types.FLOAT):
    """Everything of a view after its crop: colour jitter, grayscale, blur, flip + normalisation."""
    draws = ViewDraws(cfg)
    view, mirror = colour_stage(view, cfg, draws)
    if cfg.blur_prob > 0 and view.device == "cpu":
        radius = _blur_radius(draws.sigma, cfg)  # for every sample: the branches below must agree on types
        if draws.blur:  # the blurred view is float: each branch ends in its own normalisation
            view = normalize(
                gaussian_blur_cpu(view, draws.sigma, radius, cfg.blur_window),
                cfg.mean,
                cfg.std,
                mirror=mirror,
                dtype=output_dtype,
            )
        else:
            view = normalize(view, cfg.mean, cfg.std, mirror=mirror, dtype=output_dtype)
        return view
    if cfg.blur_prob > 0 and draws.blur:
        view = fn.gaussian_blur(view, window_size=_blur_radius(draws.sigma, cfg) * 2 + 1, sigma=draws.sigma)
    return normalize(view, cfg.mean, cfg.std, mirror=mirror, dtype=output_dtype)


def normalize(images, mean, std, mirror=0, dtype=types.FLOAT):
    """uint8 HWC -> ``(x/255 - mean) / std`` in ``dtype``, HWC (the loader hands it to torch as channels-last)."""
    return fn.crop_mirror_normalize(
        images,
        mean=[255.0 * m for m in mean],
        std=[255.0 * s for s in std],
        mirror=mirror,
        dtype=dtype,
        output_layout="HWC",
    )


def eval_resize(size: int) -> int:
    """The shorter side an evaluation image is resized to before its centre crop of ``size``: ``size / 0.875``
    (256 for 224, the standard ImageNet protocol); images of <= 64 px (CIFAR-like sets, stored at their
    size) are not enlarged: ``size`` itself."""
    return size if size <= 64 else round(size / 0.875)


def eval_view(
    images, size: int, resize_size: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD, output_dtype=types.FLOAT
):
    """Evaluation view: resize the shorter side to ``resize_size`` (default ``eval_resize(size)``), centre
    crop ``size``, normalise."""
    resize_size = resize_size or eval_resize(size)
    images = fn.resize(images, resize_shorter=resize_size, interp_type=types.INTERP_CUBIC)
    images = fn.crop(images, crop=[size, size])
    return normalize(images, mean, std, dtype=output_dtype)

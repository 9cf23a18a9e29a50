"""SimCLR augmentations as DALI graph fragments: one definition for the ``cpu`` and ``gpu`` backends.

A view is the official SimCLR code's ``crop -> flip -> colour jitter (p) -> grayscale (p) -> blur (p) ->
normalise`` (``AugmentConfig``), with ``tf.image`` semantics that the tests compare with TensorFlow's own
outputs. The functions take and return DALI ``DataNode`` s inside a pipeline built with
``enable_conditionals=True``, so a sample only pays for the operators its coins choose; per-sample work that
DALI would spread over dozens of operators runs as one compiled operator per view on the CPU (``colour_cpu``,
``crop``) and one Triton kernel on the GPU (``colour_gpu``), from one DALI random operator per view
(``ViewDraws``). Each stage, how it matches TensorFlow and why it is built so: docs/design.md (*The view*).
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

from .colour_spec import COINS, GRAY_WEIGHTS, ORDER_KEYS, UNIFORMS, jitter_ranges  # noqa: F401 (re-exported)
from .crop import crop_window

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BRIGHTNESS_IMPLS = ("simclrv2", "simclrv1")  # the official code's impl flag: multiplicative, additive
CROP_SAMPLERS = ("tf", "uniform_area")
BLUR_PADDINGS = ("zero", "reflect")


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of one SimCLR view. Defaults are the paper's ImageNet settings (Chen et al. 2020, App. A)."""

    size: int = 224
    crop_area: tuple[float, float] = (0.08, 1.0)  # fraction of the source image's area
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)  # width / height: linear ("tf"), log-uniform ("uniform_area")
    crop_attempts: int = 100  # then the whole image ("tf"; DALI's "uniform_area": a centre crop in the aspect range)
    # "tf": the official code's tf.image.sample_distorted_bounding_box (pipeline/crop.py: integer height uniform, so
    # area density ~ 1/sqrt(a)); "uniform_area": DALI's random_resized_crop (area uniform, aspect log-uniform: the
    # paper's text, torchvision's RandomResizedCrop)
    crop_sampler: str = "tf"
    crop_min_covered: float = 0.1  # "tf": min_object_covered of the whole image, so no crop is below 0.1 of it
    roi_decode: bool = False  # two views: decode each view's crop only (ROI decode) instead of the image once
    blur_padding: str = "zero"  # "zero": the official gaussian_blur's SAME padding; "reflect": reflect-101
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    jitter_strength: float = 1.0  # s: scales the four ranges below
    brightness: float = 0.8  # factor in [1 - 0.8 s, 1 + 0.8 s]
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2  # shift in [-0.2 s, 0.2 s] turns of the hexcone's hue (tf.image.adjust_hue)
    gray_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    contrast_per_channel: bool = (
        True  # pivot on each channel's mean (TF's adjust_contrast); False: one mean over all channels
    )
    # the official code's ``impl`` flag: "simclrv2" (its default) brightness x * f, f in [1 - 0.8 s, 1 + 0.8 s];
    # "simclrv1" tf.image.adjust_brightness, x + delta with delta in [-0.8 s, 0.8 s] (x in [0, 1])
    brightness_impl: str = "simclrv2"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def cifar(cls, size: int = 32, **overrides) -> AugmentConfig:
        """The paper's CIFAR-10 preset (App. B.9): 32 px, jitter strength 0.5, no blur."""
        return cls(**{"size": size, "jitter_strength": 0.5, "blur_prob": 0.0, **overrides})

    @property
    def blur_window(self) -> int:
        """The official window: ``kernel_size = side // 10``, radius ``int(kernel_size / 2)``, so 2 (side // 20) + 1
        taps (23 at 224 px, 3 at 32 px)."""
        return 2 * (self.size // 20) + 1

    def __post_init__(self):
        for name in ("flip_prob", "jitter_prob", "gray_prob", "blur_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {value}")
        if self.size < 8:
            raise ValueError(f"AugmentConfig.size must be >= 8 pixels, got {self.size}")
        if self.brightness_impl not in BRIGHTNESS_IMPLS:
            raise ValueError(
                f"AugmentConfig.brightness_impl must be one of {BRIGHTNESS_IMPLS}, got {self.brightness_impl!r}"
            )
        lo, hi = self.crop_area
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"AugmentConfig.crop_area must satisfy 0 < lo <= hi <= 1, got {self.crop_area}")
        lo, hi = self.crop_aspect
        if not 0.0 < lo <= hi:
            raise ValueError(f"AugmentConfig.crop_aspect must satisfy 0 < lo <= hi, got {self.crop_aspect}")
        if self.crop_sampler not in CROP_SAMPLERS:
            raise ValueError(f"AugmentConfig.crop_sampler must be one of {CROP_SAMPLERS}, got {self.crop_sampler!r}")
        if not 0.0 <= self.crop_min_covered <= 1.0:
            raise ValueError(f"AugmentConfig.crop_min_covered must be in [0, 1], got {self.crop_min_covered}")
        if self.crop_attempts < 1:
            raise ValueError(f"AugmentConfig.crop_attempts must be >= 1, got {self.crop_attempts}")
        if self.blur_padding not in BLUR_PADDINGS:
            raise ValueError(f"AugmentConfig.blur_padding must be one of {BLUR_PADDINGS}, got {self.blur_padding!r}")


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


def resized_crop(images, start, end, cfg: AugmentConfig):
    """The window ``[start, end)`` (absolute (y, x) per sample: ``crop.crop_window``) of each image, resized to
    ``cfg.size`` square: bicubic without antialiasing, as the official code's ``tf.image.resize``. (DALI resamples
    the window inside the whole image: its edge pixels' filter taps may reach just outside it, where TensorFlow,
    having cut the crop out first, repeats the crop's own edge.)"""
    return fn.resize(
        images,
        size=[cfg.size, cfg.size],
        roi_start=start,
        roi_end=end,
        roi_relative=False,
        interp_type=types.INTERP_CUBIC,
        antialias=False,
    )


def decode_random_crop(jpegs, cfg: AugmentConfig, device: str):
    """JPEG bytes -> the random resized crop of ``simclr_view`` (the same sampler, ``cfg.crop_sampler``), decoding
    only the crop's region (ROI decode), uint8 RGB HWC of side ``cfg.size``. ``tf``: the window from the encoded
    image's shape (``fn.peek_image_shape``), decoded by ``decoders.image_slice``; ``uniform_area``: DALI's
    ``decoders.image_random_crop``."""
    if cfg.crop_sampler == "uniform_area":
        region = fn.decoders.image_random_crop(
            jpegs,
            output_type=types.RGB,
            random_area=list(cfg.crop_area),
            random_aspect_ratio=list(cfg.crop_aspect),
            num_attempts=cfg.crop_attempts,
            **_decoder_args(device),
        )
    else:
        start, end = crop_window(fn.peek_image_shape(jpegs), cfg, dtype=types.INT32)
        region = fn.decoders.image_slice(
            jpegs, start=start, end=end, axis_names="HW", output_type=types.RGB, **_decoder_args(device)
        )
    return fn.resize(region, size=[cfg.size, cfg.size], interp_type=types.INTERP_CUBIC, antialias=False)


def _constant(value) -> DataNode:
    """A constant for DALI arithmetic as a 1-element (or n-element) array: on the CPU an arithmetic operator
    with a 0-d constant operand costs ~0.8 us per sample, with an array operand ~0.1 us (measured, DALI 2.4)."""
    return types.Constant(np.atleast_1d(np.asarray(value, np.float32)))


class ViewDraws:
    """Every random number of one view after its crop, drawn by one DALI operator: on the CPU each DALI
    operator costs about a microsecond per sample however little it computes (a 32 px colour pass, tens), so
    one vector of uniforms, scaled to each range, replaces an operator per number. Attributes: the coins
    ``jitter``, ``gray``, ``flip``, ``blur`` (booleans, ``u < p``) and ``brightness``, ``contrast``,
    ``saturation``, ``hue`` (turns), ``sigma`` (floats); the colour stages read the raw vector ``uniform``."""

    def __init__(self, cfg: AugmentConfig, uniform: DataNode | None = None):
        coins = {"jitter": cfg.jitter_prob, "gray": cfg.gray_prob, "flip": cfg.flip_prob, "blur": cfg.blur_prob}
        ranges = jitter_ranges(cfg)
        assert (*coins, *ranges, *ORDER_KEYS) == UNIFORMS
        if uniform is None:  # (tests pass their own)
            uniform = fn.random.uniform(range=[0.0, 1.0], shape=[len(UNIFORMS)])
        self.uniform = uniform  # the raw vector, as the colour stages read it
        heads = uniform < _constant([*coins.values(), *[0.0] * (len(UNIFORMS) - len(coins))])
        values = _constant([0.0] * len(coins) + [lo for lo, _ in ranges.values()] + [0.0] * len(ORDER_KEYS)) + (
            _constant([1.0] * len(coins) + [hi - lo for lo, hi in ranges.values()] + [1.0] * len(ORDER_KEYS)) * uniform
        )
        for i, name in enumerate(coins):
            setattr(self, name, heads[i])
        for i, name in enumerate(ranges, start=len(coins)):
            setattr(self, name, values[i])


def _blur_radius(sigma, cfg: AugmentConfig):
    """The blur kernel's radius for ``sigma``: ceil(4 sigma), capped at the official window's (``blur_window``)."""
    return dmath.min(fn.cast(dmath.ceil(sigma * 4.0), dtype=types.INT32), cfg.blur_window // 2)


def gaussian_blur(images, sigma, radius, max_window: int, padding: str = "zero"):
    """Separable Gaussian blur as two ``fn.filter`` passes (horizontal, then vertical, as the official
    ``gaussian_blur``), CPU or GPU images (the taps are computed on the CPU): per-sample kernel
    exp(-x^2 / 2 sigma^2), x in [-radius, radius], normalised; borders padded with zeros (``padding='zero'``, the
    official ``padding='SAME'``) or reflected without repeating the edge (``'reflect'``, reflect-101). uint8 HWC
    -> float HWC (0..255, not rounded)."""
    border = {"zero": "constant", "reflect": "reflect_101"}[padding]
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
    horizontal = fn.filter(images, fn.reshape(weights, shape=fn.stack(1, taps)), dtype=types.FLOAT, border=border)
    return fn.filter(horizontal, fn.reshape(weights, shape=fn.stack(taps, 1)), border=border)


def simclr_view(images, cfg: AugmentConfig, output_dtype=types.FLOAT, shape=None):
    """One augmented view of decoded uint8 HWC ``images`` -> normalised ``output_dtype`` HWC of side ``cfg.size``.
    ``shape``: the images' (H, W, C) as a CPU node, for the ``tf`` crop sampler (default: ``images.shape()``)."""
    if cfg.crop_sampler == "uniform_area":
        view = fn.random_resized_crop(
            images,
            size=[cfg.size, cfg.size],
            random_area=list(cfg.crop_area),
            random_aspect_ratio=list(cfg.crop_aspect),
            num_attempts=cfg.crop_attempts,
            interp_type=types.INTERP_CUBIC,
            antialias=False,  # as the official code's tf.image.resize (bicubic, no antialiasing)
        )
    else:
        start, end = crop_window(images.shape() if shape is None else shape, cfg)
        view = resized_crop(images, start, end, cfg)
    return augment_cropped(view, cfg, output_dtype)


# On the CPU the colour stage (jitter, grayscale, flip) is one compiled operator (``colour_cpu``); True runs the
# GPU's form there instead (``colour_gpu``'s Triton kernel, under the Triton interpreter: for tests).
colour_by_gpu_form = False


def colour_stage(view, cfg: AugmentConfig, draws: ViewDraws):
    """Colour jitter (p), grayscale (p) and the flip (p) of uint8 HWC views -> (views, mirror), with
    ``tf.image`` semantics (``colour_cpu``'s docstring). The flip commutes with every colour op: on the CPU
    the compiled stage (``colour_cpu``) writes the pixels mirrored and ``mirror`` is 0; the GPU's kernel
    (``colour_gpu``) leaves the flip to the final normalisation: ``mirror`` is the per-sample coin."""
    if view.device == "cpu" and not colour_by_gpu_form:
        from .colour_cpu import compiled_colour_stage

        return compiled_colour_stage(view, draws.uniform, cfg), 0
    from .colour_gpu import kernel_colour_stage

    return kernel_colour_stage(view, draws.uniform, cfg), fn.cast(draws.flip, dtype=types.INT32)


def augment_cropped(view, cfg: AugmentConfig, output_dtype=types.FLOAT):
    """Everything of a view after its crop: colour jitter, grayscale, blur, flip + normalisation."""
    draws = ViewDraws(cfg)
    view, mirror = colour_stage(view, cfg, draws)
    if cfg.blur_prob > 0:
        radius = _blur_radius(draws.sigma, cfg)  # for every sample: the branches below must agree on types
        if draws.blur:  # the blurred view is float: each branch ends in its own normalisation
            blurred = gaussian_blur(view, draws.sigma, radius, cfg.blur_window, cfg.blur_padding)
            view = normalize(blurred, cfg.mean, cfg.std, mirror=mirror, dtype=output_dtype)
        else:
            view = normalize(view, cfg.mean, cfg.std, mirror=mirror, dtype=output_dtype)
        return view
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

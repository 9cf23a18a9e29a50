"""SimCLR augmentations as DALI graph fragments: one definition for the ``cpu`` and ``gpu`` backends.

A view is ``crop -> flip -> colour jitter (p) -> grayscale (p) -> blur (p) -> normalise``, with the
parameters of the official SimCLR code (``AugmentConfig``). The functions here take and return DALI
``DataNode`` s and must be called inside a DALI pipeline definition built with
``enable_conditionals=True``: the random choices are per-sample ``if`` statements, so a sample only
pays for the operators it goes through.

How the colour jitter maps onto DALI's operators (measured choices, see bench/results and the README):
- brightness and contrast are one pass, saturation and hue one ``hsv`` pass (DALI's linear YIQ
  approximation of HSV). Within a pass the two adjustments commute exactly, so the official code's
  random order of the four survives as a random order of the two passes. Images are uint8 and every
  pass saturates: values are clipped after each pass (the official code clips after each of the four
  adjustments; here not between the two inside one pass). One pass instead of two halves the cost on
  the CPU, where every DALI operator is a full sweep over the image.
- contrast pivots on each channel's own mean, as TensorFlow's ``adjust_contrast`` in the official code
  (``contrast_per_channel=False``: one mean over all channels, torchvision's rule). DALI's
  ``brightness_contrast`` takes one scalar pivot, so on the CPU the per-channel form is one
  ``crop_mirror_normalize`` pass to uint8 (``(x - mu) * s`` with ``s = b c``, ``mu = m (c - 1) / c``),
  on the GPU arithmetic on the device (DALI's named arguments cannot be GPU data).
- grayscale is ``color_space_conversion`` RGB -> GRAY -> RGB (luma 0.299/0.587/0.114: a fixed-point
  kernel ~50x cheaper on the CPU than ``hsv`` with saturation 0, which it matches to +-1 level).
- the blur kernel is truncated at 4 sigma (capped at the paper's window, 23 taps at 224 px): the
  weights left out are < 1e-4 of the kernel's mass, and a sigma of 0.1 no longer pays for 23 taps.
  On the CPU it is two 1-D ``fn.filter`` passes with the same per-sample Gaussian (DALI's CPU
  ``gaussian_blur`` is 5-9x slower for the same result); the blurred view goes to the normalisation
  unrounded (float). On the GPU it stays ``gaussian_blur``.
Images are uint8 HWC between operators; the flip is fused into the final normalisation (it commutes
with every colour operator).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

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


# nvJPEG settings of NVIDIA's own ResNet-50 DALI example (mixed backend only): buffers preallocated for
# ImageNet's largest image, so that no batch waits on a reallocation, and the share of the images sent
# to the hardware JPEG decoder (A100/H100); the device padding is per DALI thread.
GPU_DECODER = {
    "hw_decoder_load": 0.65,
    "device_memory_padding": 211_025_920,
    "host_memory_padding": 140_544_512,
    "preallocate_width_hint": 5_980,
    "preallocate_height_hint": 6_430,
}


def _decoder_args(device: str) -> dict:
    return {"device": "mixed", **GPU_DECODER} if device == "gpu" else {"device": "cpu"}


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


def _to_device(scalar, like):
    """A per-sample CPU scalar placed where ``like`` lives, for arithmetic with it."""
    return scalar.gpu() if like.device == "gpu" else scalar


def _uniform(lo: float, hi: float):
    return fn.random.uniform(range=[lo, hi])


def _coin(probability: float):
    return fn.random.coin_flip(probability=probability, dtype=types.BOOL)


def brightness_contrast(images, brightness, contrast, per_channel: bool = True):
    """``brightness * (m + contrast * (x - m))`` saturated to uint8; m = each channel's mean (TF's
    ``adjust_contrast``) or, with ``per_channel=False``, the mean over all channels.

    On the CPU, per channel: one ``crop_mirror_normalize`` pass, ``(x - mu) * s`` with ``s = b c`` and
    ``mu = m (c - 1) / c`` (c is clamped to >= 1e-3: the jitter's contrast range starts at 1 - 0.8 s > 0
    for s < 1.25); per image: DALI's ``brightness_contrast`` with the pivot as a per-sample argument. On
    the GPU the pivot is GPU data and DALI's named arguments must live on the CPU, so the same formula is
    written as arithmetic on the device (``contrast_by_arithmetic`` forces that form here, for tests)."""
    if images.device == "gpu" or contrast_by_arithmetic:
        pivot = fn.reductions.mean(
            images, axes=[0, 1] if per_channel else [0, 1, 2], keep_dims=True
        )  # (1, 1, 3) or (1, 1, 1)
        b, c = _to_device(brightness, images), _to_device(contrast, images)
        return fn.cast(dmath.clamp((pivot + (images - pivot) * c) * b, 0, 255), dtype=types.UINT8)
    if per_channel:
        c = max(contrast, 1e-3) if isinstance(contrast, (int, float)) else dmath.max(contrast, 1e-3)
        mu = fn.reductions.mean(images, axes=[0, 1]) * ((c - 1.0) / c)
        return fn.crop_mirror_normalize(
            images, mean=mu, std=1.0 / (brightness * c), dtype=types.UINT8, output_layout="HWC"
        )
    return fn.brightness_contrast(
        images, brightness=brightness, contrast=contrast, contrast_center=fn.reductions.mean(images)
    )


contrast_by_arithmetic = False


def color_jitter(images, cfg: AugmentConfig):
    """The official ``color_jitter_rand``: brightness and contrast factors in [1 - 0.8 s, 1 + 0.8 s]
    (multiplicative; contrast pivots on the mean), saturation likewise, hue shifted by up to 0.2 s of
    the colour wheel, in a random order (of the two passes, see the module docstring)."""
    s = cfg.jitter_strength
    factor = lambda amount: _uniform(max(0.0, 1.0 - amount * s), 1.0 + amount * s) if amount * s > 0 else 1.0
    brightness, contrast, saturation = factor(cfg.brightness), factor(cfg.contrast), factor(cfg.saturation)
    hue = _uniform(-cfg.hue * s * 360.0, cfg.hue * s * 360.0) if cfg.hue * s > 0 else 0.0  # degrees
    if _coin(0.5):
        images = brightness_contrast(images, brightness, contrast, cfg.contrast_per_channel)
        images = fn.hsv(images, saturation=saturation, hue=hue)
    else:
        images = fn.hsv(images, saturation=saturation, hue=hue)
        images = brightness_contrast(images, brightness, contrast, cfg.contrast_per_channel)
    return images


def grayscale(images):
    """Luma (0.299 R + 0.587 G + 0.114 B) in all three channels."""
    gray = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    return fn.color_space_conversion(gray, image_type=types.GRAY, output_type=types.RGB)


def _blur_parameters(cfg: AugmentConfig):
    """sigma ~ U[blur_sigma] and its kernel's radius: ceil(4 sigma), capped at the paper's window."""
    sigma = _uniform(*cfg.blur_sigma)
    return sigma, dmath.min(fn.cast(dmath.ceil(sigma * 4.0), dtype=types.INT32), cfg.blur_window // 2)


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


def augment_cropped(view, cfg: AugmentConfig, output_dtype=types.FLOAT):
    """Everything of a view after its crop: colour jitter, grayscale, blur, flip + normalisation."""
    if cfg.jitter_prob > 0 and _coin(cfg.jitter_prob):
        view = color_jitter(view, cfg)
    if cfg.gray_prob > 0 and _coin(cfg.gray_prob):
        view = grayscale(view)
    mirror = fn.random.coin_flip(
        probability=cfg.flip_prob
    )  # commutes with every colour operator: fused into the normalisation
    if cfg.blur_prob > 0 and view.device == "cpu":
        sigma, radius = _blur_parameters(cfg)  # drawn for every sample: the branches below must agree on types
        if _coin(cfg.blur_prob):  # the blurred view is float: each branch ends in its own normalisation
            view = normalize(
                gaussian_blur_cpu(view, sigma, radius, cfg.blur_window),
                cfg.mean,
                cfg.std,
                mirror=mirror,
                dtype=output_dtype,
            )
        else:
            view = normalize(view, cfg.mean, cfg.std, mirror=mirror, dtype=output_dtype)
        return view
    if cfg.blur_prob > 0 and _coin(cfg.blur_prob):
        sigma, radius = _blur_parameters(cfg)
        view = fn.gaussian_blur(view, window_size=radius * 2 + 1, sigma=sigma)
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

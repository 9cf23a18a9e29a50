"""SimCLR augmentations as DALI graph fragments: one definition for the ``cpu`` and ``gpu`` backends.

A view is ``crop -> flip -> colour jitter (p) -> grayscale (p) -> blur (p) -> normalise``, with the
parameters of the official SimCLR code (``AugmentConfig``). The functions here take and return DALI
``DataNode`` s and must be called inside a DALI pipeline definition built with
``enable_conditionals=True``: the random choices are per-sample ``if`` statements, so a sample only
pays for the operators it goes through.

How the colour jitter maps onto DALI's operators (measured choices, see bench/results):
- brightness and contrast are one ``brightness_contrast`` pass, saturation and hue one ``hsv`` pass
  (DALI's linear YIQ approximation of HSV). Within a pass the two adjustments commute exactly, so the
  official code's random order of the four survives as a random order of the two passes. Images are
  uint8 and every pass saturates: values are clipped after each pass (the official code clips after
  each of the four adjustments; here not between the two inside one pass). One pass instead of two
  halves the cost on the CPU, where every DALI operator is a full sweep over the image.
- the blur kernel is truncated at 4 sigma (capped at the paper's window, 23 taps at 224 px): the
  weights left out are < 1e-4 of the kernel's mass, and a sigma of 0.1 no longer pays for 23 taps.
Images are uint8 HWC between operators; the flip is fused into the final normalisation (it commutes
with every colour operator).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def decode(jpegs, device: str):
    """JPEG bytes -> uint8 RGB HWC. ``device='gpu'`` uses DALI's "mixed" decoder (nvJPEG, with the
    hardware JPEG decoder where the GPU has one); ``'cpu'`` uses libjpeg-turbo."""
    return fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)


def _to_device(scalar, like):
    """A per-sample CPU scalar placed where ``like`` lives, for arithmetic with it."""
    return scalar.gpu() if like.device == "gpu" else scalar


def _uniform(lo: float, hi: float):
    return fn.random.uniform(range=[lo, hi])


def _coin(probability: float):
    return fn.random.coin_flip(probability=probability, dtype=types.BOOL)


def brightness_contrast(images, brightness, contrast):
    """``brightness * (m + contrast * (x - m))`` saturated to uint8, m = the image's mean intensity.

    On the CPU, DALI's ``brightness_contrast`` with the pivot as a per-sample argument. On the GPU the
    pivot is GPU data and DALI's named arguments must live on the CPU, so the same formula is written
    as arithmetic on the device (``contrast_by_arithmetic`` forces that form here, for tests)."""
    if images.device == "gpu" or contrast_by_arithmetic:
        pivot = fn.reductions.mean(images, keep_dims=True)  # (1, 1, 1)
        b, c = _to_device(brightness, images), _to_device(contrast, images)
        return fn.cast(dmath.clamp((pivot + (images - pivot) * c) * b, 0, 255), dtype=types.UINT8)
    return fn.brightness_contrast(images, brightness=brightness, contrast=contrast, contrast_center=fn.reductions.mean(images))


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
        images = brightness_contrast(images, brightness, contrast)
        images = fn.hsv(images, saturation=saturation, hue=hue)
    else:
        images = fn.hsv(images, saturation=saturation, hue=hue)
        images = brightness_contrast(images, brightness, contrast)
    return images


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
    if cfg.jitter_prob > 0 and _coin(cfg.jitter_prob):
        view = color_jitter(view, cfg)
    if cfg.gray_prob > 0 and _coin(cfg.gray_prob):
        view = fn.hsv(view, saturation=0.0)  # luma (0.299 R + 0.587 G + 0.114 B) in all three channels
    if cfg.blur_prob > 0 and _coin(cfg.blur_prob):
        sigma = _uniform(*cfg.blur_sigma)
        window = dmath.min(fn.cast(dmath.ceil(sigma * 4.0), dtype=types.INT32) * 2 + 1, cfg.blur_window)
        view = fn.gaussian_blur(view, window_size=window, sigma=sigma)
    # The flip commutes with every colour operator, so it is fused into the final normalisation.
    return normalize(view, cfg.mean, cfg.std, mirror=fn.random.coin_flip(probability=cfg.flip_prob), dtype=output_dtype)


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


def eval_view(images, size: int, resize_size: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD, output_dtype=types.FLOAT):
    """Evaluation view: resize the shorter side to ``resize_size`` (default ``eval_resize(size)``), centre
    crop ``size``, normalise."""
    resize_size = resize_size or eval_resize(size)
    images = fn.resize(images, resize_shorter=resize_size, interp_type=types.INTERP_CUBIC)
    images = fn.crop(images, crop=[size, size])
    return normalize(images, mean, std, dtype=output_dtype)

"""SimCLR augmentations as DALI graph fragments: one definition for the ``cpu`` and ``gpu`` backends.

A view is ``crop -> flip -> colour jitter (p) -> grayscale (p) -> blur (p) -> normalise``, with the
parameters of the official SimCLR code (``AugmentConfig``). The functions here take and return DALI
``DataNode`` s and must be called inside a DALI pipeline definition built with
``enable_conditionals=True``: the random choices (apply jitter? in which order? blur?) are per-sample
``if`` statements, so a sample only pays for the operators it actually goes through.

Images are kept as uint8 HWC between operators: every colour operator saturates its uint8 output,
which is exactly the paper's "clip to [0, 1] after each adjustment".
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


def color_jitter(images, cfg: AugmentConfig):
    """The official SimCLR ``color_jitter_rand``: brightness, contrast, saturation and hue with random
    factors, applied in a random order per image, each saturating to the valid range."""
    s = cfg.jitter_strength
    ranges = {
        "brightness": (max(0.0, 1.0 - cfg.brightness * s), 1.0 + cfg.brightness * s),
        "contrast": (max(0.0, 1.0 - cfg.contrast * s), 1.0 + cfg.contrast * s),
        "saturation": (max(0.0, 1.0 - cfg.saturation * s), 1.0 + cfg.saturation * s),
        "hue": (-cfg.hue * s * 360.0, cfg.hue * s * 360.0),  # degrees of the colour wheel
    }
    factors = {name: _uniform(lo, hi) for name, (lo, hi) in ranges.items() if hi > lo}  # a zero range is no operation

    def apply(name, x):
        if name == "brightness":  # multiplicative, as the official code's default (and torchvision)
            return fn.brightness_contrast(x, brightness=factors[name])
        if name == "contrast":  # pivot on the image's mean intensity
            # Arithmetic, not brightness_contrast(contrast_center=mean): on the GPU the mean is GPU data,
            # and DALI's named arguments must live on the CPU.
            mean = fn.reductions.mean(x, keep_dims=True)
            return fn.cast(dmath.clamp((x - mean) * _to_device(factors[name], x) + mean, 0, 255), dtype=types.UINT8)
        if name == "saturation":
            return fn.hsv(x, saturation=factors[name])
        return fn.hsv(x, hue=factors[name])

    # A random permutation per sample: the rank of each operator's uniform key is its position.
    keys = [fn.random.uniform(range=[0.0, 1.0]) for _ in factors]
    positions = [sum(fn.cast(keys[j] < keys[i], dtype=types.INT32) for j in range(len(keys)) if j != i) for i in range(len(keys))]
    for slot in range(len(factors)):
        for position, name in zip(positions, factors):
            if position == slot:
                images = apply(name, images)
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
    )
    if cfg.jitter_prob > 0 and fn.random.coin_flip(probability=cfg.jitter_prob, dtype=types.BOOL):
        view = color_jitter(view, cfg)
    if cfg.gray_prob > 0 and fn.random.coin_flip(probability=cfg.gray_prob, dtype=types.BOOL):
        view = fn.hsv(view, saturation=0.0)  # luma (0.299 R + 0.587 G + 0.114 B) in all three channels
    if cfg.blur_prob > 0 and fn.random.coin_flip(probability=cfg.blur_prob, dtype=types.BOOL):
        view = fn.gaussian_blur(view, window_size=cfg.blur_window, sigma=_uniform(*cfg.blur_sigma))
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


def eval_view(images, size: int, resize_size: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD, output_dtype=types.FLOAT):
    """Evaluation view: resize the shorter side to ``resize_size`` (default ``size / 0.875``, e.g. 256 for
    224; for images already at ``size`` pass ``resize_size=size``), centre crop ``size``, normalise."""
    resize_size = resize_size or round(size / 0.875)
    images = fn.resize(images, resize_shorter=resize_size, interp_type=types.INTERP_CUBIC)
    images = fn.crop(images, crop=[size, size])
    return normalize(images, mean, std, dtype=output_dtype)

"""The parameters of one SimCLR view (``AugmentConfig``): what ``pipeline/augment.py`` builds in DALI and what a
training config nests as its ``augment`` section (``--augment.size 32``, ``augment: {preset: cifar}`` in YAML).

Light on purpose (no DALI, no torch): the training config parses and checks it before anything heavy is
imported. Each field is declared here once, with its documentation (``--help`` shows it) and its check
(``__post_init__``: a bad value fails at parse time, naming the field)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BRIGHTNESS_IMPLS = (
    "simclrv2",
    "simclrv1",
)  # the official code's impl flag: multiplicative, additive
CROP_SAMPLERS = ("tf", "uniform_area")
BLUR_PADDINGS = ("zero", "reflect")
# what each preset sets where a field is left null: the paper's ImageNet view, and its CIFAR-10 one (App. B.9)
PRESETS = {
    "imagenet": {"jitter_strength": 1.0, "blur_prob": 0.5},
    "cifar": {"jitter_strength": 0.5, "blur_prob": 0.0},
}


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of one SimCLR view. Defaults are the paper's ImageNet settings (Chen et al. 2020, App. A)."""

    preset: Literal["imagenet", "cifar"] = "imagenet"
    """imagenet (the paper's: jitter strength 1, blur p=0.5) or cifar (strength 0.5, no blur)."""
    size: int = 224
    """Side of each augmented view, in pixels (>= 8)."""
    crop_area: tuple[float, float] = (0.08, 1.0)
    """Random resized crop: the range of the crop's area, as fractions of the image's area."""
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    """The crop's width / height range: drawn linearly (tf) or log-uniformly (uniform_area)."""
    crop_attempts: int = 100
    """Crop draws before the fallback: the whole image (tf), a centre crop in the aspect range (uniform_area)."""
    crop_sampler: Literal["tf", "uniform_area"] = "tf"
    """tf: the official code's tf.image.sample_distorted_bounding_box (integer height drawn uniformly,
    min_object_covered 0.1, whole image as fallback); uniform_area: DALI's random_resized_crop (area uniform,
    aspect log-uniform: the paper's text, torchvision's)."""
    crop_min_covered: float = 0.1
    """tf sampler: min_object_covered of the whole image, so no crop is below this fraction of it."""
    roi_decode: bool = False
    """Decode only each view's crop region (two partial decodes per image) instead of the whole image once."""
    blur_padding: Literal["zero", "reflect"] = "zero"
    """Gaussian blur borders: zero (the official gaussian_blur's SAME padding) or reflect (reflect-101)."""
    flip_prob: float = 0.5
    """Horizontal flip probability."""
    jitter_prob: float = 0.8
    """Colour jitter probability."""
    jitter_strength: float | None = None
    """Colour jitter strength s (scales the four ranges below), in [0, 10]; null = the preset's."""
    brightness: float = 0.8
    """Brightness range: a factor in [1 - 0.8 s, 1 + 0.8 s] (simclrv2) or a delta in [-0.8 s, 0.8 s] (simclrv1)."""
    contrast: float = 0.8
    """Contrast range, times s."""
    saturation: float = 0.8
    """Saturation range, times s."""
    hue: float = 0.2
    """Hue shift in [-0.2 s, 0.2 s] turns of the hexcone's hue (tf.image.adjust_hue)."""
    gray_prob: float = 0.2
    """Grayscale probability."""
    blur_prob: float | None = None
    """Gaussian blur probability per view; null = the preset's."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Range of the blur's sigma, in pixels."""
    contrast_per_channel: bool = True
    """Colour jitter's contrast pivots on each channel's own mean (TensorFlow's adjust_contrast, the official code);
    false: on one mean over all channels (torchvision's)."""
    brightness_impl: Literal["simclrv2", "simclrv1"] = "simclrv2"
    """Colour jitter's brightness, the official code's impl flag: simclrv2 (its default) multiplies by a factor in
    [1 - 0.8 s, 1 + 0.8 s]; simclrv1 adds a delta in [-0.8 s, 0.8 s] (tf.image.adjust_brightness, values in [0, 1])."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean the view is normalised with."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation the view is normalised with."""

    @classmethod
    def cifar(cls, size: int = 32, **overrides) -> AugmentConfig:
        """The paper's CIFAR-10 preset (App. B.9): 32 px, jitter strength 0.5, no blur."""
        return cls(**{"preset": "cifar", "size": size, **overrides})

    @property
    def blur_window(self) -> int:
        """The official window: ``kernel_size = side // 10``, radius ``int(kernel_size / 2)``, so 2 (side // 20) + 1
        taps (23 at 224 px, 3 at 32 px)."""
        return 2 * (self.size // 20) + 1

    def __post_init__(self):
        for name in (
            "crop_area",
            "crop_aspect",
            "blur_sigma",
            "mean",
            "std",
        ):  # lists from YAML / JSON
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.preset not in PRESETS:
            raise ValueError(f"augment.preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        for name, value in PRESETS[self.preset].items():  # null: the preset's value
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name, value in self._problems():
            raise ValueError(f"augment.{name} {value}")

    def _problems(self):
        """(field, what is wrong) for every bad value; ``not x >= lo`` also catches nan."""
        for name in ("flip_prob", "jitter_prob", "gray_prob", "blur_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                yield name, f"must be in [0, 1], got {getattr(self, name)}"
        if not 0 <= self.jitter_strength <= 10:
            yield "jitter_strength", f"must be in [0, 10], got {self.jitter_strength}"
        for name in ("brightness", "contrast", "saturation", "hue"):
            if not 0 <= getattr(self, name) <= 10:
                yield name, f"must be in [0, 10], got {getattr(self, name)}"
        if not self.size >= 8:
            yield "size", f"must be >= 8 pixels, got {self.size}"
        if not 0.0 < self.crop_area[0] <= self.crop_area[1] <= 1.0:
            yield "crop_area", f"must satisfy 0 < lo <= hi <= 1, got {self.crop_area}"
        if not 0.0 < self.crop_aspect[0] <= self.crop_aspect[1] < float("inf"):
            yield "crop_aspect", f"must satisfy 0 < lo <= hi, got {self.crop_aspect}"
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1] < float("inf"):
            yield "blur_sigma", f"must satisfy 0 < lo <= hi, got {self.blur_sigma}"
        if not 0.0 <= self.crop_min_covered <= 1.0:
            yield "crop_min_covered", f"must be in [0, 1], got {self.crop_min_covered}"
        if not self.crop_attempts >= 1:
            yield "crop_attempts", f"must be >= 1, got {self.crop_attempts}"
        if not all(s > 0 for s in self.std):
            yield "std", f"must be > 0 per channel, got {self.std}"
        for name, choices in (
            ("brightness_impl", BRIGHTNESS_IMPLS),
            ("crop_sampler", CROP_SAMPLERS),
            ("blur_padding", BLUR_PADDINGS),
        ):
            if getattr(self, name) not in choices:
                yield name, f"must be one of {choices}, got {getattr(self, name)!r}"


def view_size(config: dict) -> int | None:
    """The view's side in a saved training config of any version (``augment.size``; earlier: ``image_size``)."""
    section = config.get("augment")
    return section.get("size") if isinstance(section, dict) else config.get("image_size")

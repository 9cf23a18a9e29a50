"""Statistical tests of the SimCLR view against its definition (pipeline/augment.py), on DALI's CPU backend
and (marked gpu, skipped without CUDA) its GPU backend: the same graph, the same statistics.

Each test feeds images built for it through the product's own ``simclr_view`` and measures one
property over many samples: crop area and aspect distributions, flip / jitter / grayscale / blur
rates, jitter factor ranges. Tolerances are ~4 standard errors, so a wrong parameter (p=0.5 instead
of 0.8, crop area from 0.2 instead of 0.08, ...) fails."""

from __future__ import annotations

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types

from simclr_dali.pipeline.augment import AugmentConfig, eval_view, simclr_view

IDENTITY_NORM = dict(
    mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255)
)  # outputs in 0..255 units
PLAIN = dict(jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0, flip_prob=0.0, **IDENTITY_NORM)
BATCH = 250
# DALI backends: the CPU (its colour stage: the compiled operator of pipeline/colour_cpu.py) and the GPU (needs
# CUDA; its colour stage: the Triton kernel of pipeline/colour_gpu.py, also checked on the CPU under the Triton
# interpreter against TensorFlow's outputs in tests/test_colour_tf.py).
DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES, scope="module")
def device(request) -> str:
    return request.param


def run_views(
    image: np.ndarray, cfg: AugmentConfig, count: int, seed: int = 0, device: str = "cpu"
) -> np.ndarray:
    """``count`` independent views of ``image`` (H, W, 3 uint8), augmented on DALI's ``device`` backend
    ('cpu' or 'gpu') -> float array (count, S, S, 3)."""
    pipe = _views_pipeline(image, cfg, seed, device)
    out = []
    while sum(len(o) for o in out) < count:
        (batch,) = pipe.run()
        batch = batch.as_cpu() if device == "gpu" else batch
        out.append(np.stack([np.asarray(batch[i]) for i in range(len(batch))]))
    return np.concatenate(out)[:count]


def _views_pipeline(image, cfg, seed, device):

    @pipeline_def(
        batch_size=BATCH,
        num_threads=2,
        device_id=0 if device == "gpu" else None,
        seed=seed,
        enable_conditionals=True,
        prefetch_queue_depth=1,
    )
    def views():
        images = fn.external_source(
            source=lambda: [image] * BATCH, batch=True, layout="HWC", dtype=types.UINT8
        )
        return simclr_view(images.gpu() if device == "gpu" else images, cfg)

    return views()


def ks_statistic(samples: np.ndarray, reference: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    grid = np.sort(np.concatenate([samples, reference]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
    return float(np.abs(cdf(samples) - cdf(reference)).max())


def reference_crops(count, area=(0.08, 1.0), aspect=(3 / 4, 4 / 3), side=256, attempts=100, seed=0):
    """The crop sampler of the paper's text and torchvision (``crop_sampler='uniform_area'``): area ~ U(area) x image
    area, log-uniform aspect, retry until it fits, else a centre crop. Returns (area fractions, aspects)."""
    rng = np.random.default_rng(seed)
    areas, aspects = [], []
    for _ in range(count):
        for _ in range(attempts):
            a = rng.uniform(*area) * side * side
            r = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
            w, h = np.sqrt(a * r), np.sqrt(a / r)
            if w <= side and h <= side:
                break
        else:
            w = h = side
        areas.append(w * h / side**2)
        aspects.append(w / h)
    return np.array(areas), np.array(aspects)


COORDINATES = np.stack(
    [*np.meshgrid(np.arange(256), np.arange(256)), np.full((256, 256), 128)], -1
).astype(np.uint8)  # R=x, G=y


def measure_crops(views: np.ndarray, size: int):
    """Crop window (x0, width, height, flipped) from views of COORDINATES: R encodes x, G encodes y."""
    inner = size - 3  # columns/rows 1 and size-2: away from the resampling filter's edge effects
    left, right = views[:, size // 2, 1, 0], views[:, size // 2, size - 2, 0]
    top, bottom = views[:, 1, size // 2, 1], views[:, size - 2, size // 2, 1]
    width = np.abs(right - left) * size / inner
    height = (bottom - top) * size / inner
    return width, height, right < left


@pytest.fixture(scope="module")
def crop_views(device):
    """Views with the ``uniform_area`` sampler (DALI's random_resized_crop); the default, TensorFlow's sampler, is
    tested against TensorFlow's own draws in test_geometry.py."""
    plain = {k: v for k, v in PLAIN.items() if k != "flip_prob"}
    cfg = AugmentConfig(size=64, flip_prob=0.5, crop_sampler="uniform_area", **plain)
    return run_views(COORDINATES, cfg, 2000, seed=1, device=device)


def test_uniform_area_crop_follows_the_papers_text(crop_views):
    width, height, _ = measure_crops(crop_views, 64)
    areas, aspects = width * height / 256**2, width / height
    ref_areas, ref_aspects = reference_crops(20000)
    assert ks_statistic(areas, ref_areas) < 0.06
    assert ks_statistic(np.log(aspects), np.log(ref_aspects)) < 0.06
    assert 0.06 < areas.min() < 0.12 and areas.max() > 0.9
    # a wrong range would be caught: crops from area 0.2 are clearly another distribution
    wrong_areas, _ = reference_crops(20000, area=(0.2, 1.0))
    assert ks_statistic(areas, wrong_areas) > 0.1


def test_flip_rate(crop_views):
    _, _, flipped = measure_crops(crop_views, 64)
    assert abs(flipped.mean() - 0.5) < 0.045


def two_tone(left, right, size=32):
    image = np.empty((size, size, 3), np.uint8)
    image[:, : size // 2], image[:, size // 2 :] = left, right
    return image


FULL_FRAME = dict(
    size=32, crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0)
)  # the view is the whole image


@pytest.mark.parametrize("prob", [0.8, 0.3])
def test_jitter_probability(prob, device):
    image = two_tone((200, 60, 90), (40, 150, 220))
    cfg = AugmentConfig(**FULL_FRAME, **{**PLAIN, "jitter_prob": prob})
    views = run_views(image, cfg, 1500, seed=2, device=device)
    changed = np.abs(views - image).reshape(len(views), -1).max(1) > 3
    assert abs(changed.mean() - prob) < 0.05


def uniform_ks(values, lo, hi):
    return ks_statistic(values, np.random.default_rng(0).uniform(lo, hi, 50000))


def only(op: str, strength: float = 1.0) -> AugmentConfig:
    ranges = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
    ranges[op] = AugmentConfig.__dataclass_fields__[op].default
    return AugmentConfig(
        **FULL_FRAME, **{**PLAIN, "jitter_prob": 1.0}, jitter_strength=strength, **ranges
    )


def test_brightness_range(device):
    views = run_views(
        np.full((32, 32, 3), 100, np.uint8), only("brightness"), 1000, seed=3, device=device
    )
    factors = views[:, 5, 5, 0] / 100
    assert uniform_ks(factors, 0.2, 1.8) < 0.07  # [1 - 0.8 s, 1 + 0.8 s], s = 1


def test_contrast_range_pivots_on_the_mean(device):
    views = run_views(
        two_tone(60, 140), only("contrast", 0.5), 1000, seed=4, device=device
    )  # CIFAR strength 0.5
    low, high = views[:, 5, 5, 0], views[:, 5, 25, 0]
    assert np.allclose((low + high) / 2, 100, atol=1.0)  # the mean stays
    assert uniform_ks((high - low) / 80, 0.6, 1.4) < 0.07


def _constant(batch):
    return lambda: (
        batch
    )  # (a source that takes an argument is given the iteration number: bind by value)


@pytest.mark.parametrize("padding", ["zero", "reflect"])
def test_blur_is_the_truncated_gaussian(padding):
    """The blur (two 1-D ``fn.filter`` passes) against a float64 separable Gaussian: radius ceil(4 sigma) capped at
    the window, borders padded with zeros (the official SAME padding) or reflect-101 (the option)."""
    from simclr_dali.pipeline.augment import gaussian_blur
    from simclr_dali.pipeline.view_plan import blur_kernels

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) for _ in range(4)]
    sigmas, window = [0.1, 0.7, 1.3, 2.0], 23

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def blur():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC", dtype=types.UINT8)
        sigma = fn.external_source(source=lambda: [np.float32(v) for v in sigmas], batch=True)
        cfg = AugmentConfig(size=230)  # the official window of 230 px: 23 taps
        assert cfg.blur_window == window
        return gaussian_blur(x, *blur_kernels(sigma, cfg), padding)

    (out,) = blur().run()
    for image, sigma, got in zip(images, sigmas, out):
        radius = int(min(np.ceil(4 * sigma), window // 2))
        taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
        taps /= taps.sum()
        mode = "constant" if padding == "zero" else "reflect"  # numpy's "reflect" is reflect-101
        padded = np.pad(
            image.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)), mode=mode
        )
        rows = sum(t * padded[:, k : k + image.shape[1]] for k, t in enumerate(taps))
        expected = sum(t * rows[k : k + image.shape[0]] for k, t in enumerate(taps))
        assert (
            np.asarray(got).dtype == np.float32 and np.abs(np.asarray(got) - expected).max() < 0.05
        )


def test_saturation_range(device):
    """adjust_saturation scales HSV's S, keeping V (the max) and the hue: for (150, 100, 50) the blue channel is
    150 - 100 min(f, 1.5) (S = 2/3 clips at 1 from f = 1.5), f ~ U[0.2, 1.8] at s = 1."""
    colour = np.array([150, 100, 50], np.uint8)
    image = np.broadcast_to(colour, (32, 32, 3)).copy()
    views = run_views(image, only("saturation"), 1000, seed=5, device=device)
    assert np.abs(views[:, 5, 5, 0] - 150).max() <= 0.5  # V kept
    factors = (150 - views[:, 5, 5, 2]) / 100
    reference = np.minimum(np.random.default_rng(0).uniform(0.2, 1.8, 50000), 1.5)
    assert ks_statistic(factors, reference) < 0.07


def hexcone_hue(rgb: np.ndarray) -> np.ndarray:
    """HSV's hue in turns ([0, 1)) of float RGB values (..., 3)."""
    r, g, b = np.moveaxis(rgb.astype(np.float64), -1, 0)
    hi, chroma = rgb.max(-1), np.ptp(rgb, axis=-1)
    sector = np.where(
        hi == r, (g - b) / chroma, np.where(hi == g, (b - r) / chroma + 2, (r - g) / chroma + 4)
    )
    return (sector / 6) % 1.0


def test_hue_range(device):
    """adjust_hue shifts the hexcone hue by delta ~ U[-0.2 s, 0.2 s] turns and keeps min and max."""
    colour = np.array([180, 90, 60], np.float64)
    image = np.broadcast_to(colour.astype(np.uint8), (32, 32, 3)).copy()
    views = run_views(image, only("hue"), 1000, seed=6, device=device)
    pixels = views[:, 5, 5]
    assert np.abs(pixels.max(-1) - 180).max() <= 0.5 and np.abs(pixels.min(-1) - 60).max() <= 0.5
    shift = (hexcone_hue(pixels) - hexcone_hue(colour) + 0.5) % 1.0 - 0.5
    assert uniform_ks(shift, -0.2, 0.2) < 0.07  # s = 1


def test_grayscale_rate_and_luma(device):
    image = np.broadcast_to(np.array([200, 50, 100], np.uint8), (32, 32, 3)).copy()
    views = run_views(
        image,
        AugmentConfig(**FULL_FRAME, **{**PLAIN, "gray_prob": 0.2}),
        2000,
        seed=7,
        device=device,
    )
    gray = np.ptp(views[:, 5, 5], axis=1) < 2
    assert abs(gray.mean() - 0.2) < 0.04
    # tf.image.rgb_to_grayscale's weights: 100.53
    assert np.allclose(views[gray][:, 5, 5], 0.2989 * 200 + 0.5870 * 50 + 0.1140 * 100, atol=0.5)


def test_blur_rate_and_window(device):
    assert AugmentConfig(size=224).blur_window == 23 and AugmentConfig(size=32).blur_window == 3
    checker = (np.indices((64, 64)).sum(0) % 2 * 200 + 28).astype(np.uint8)[..., None].repeat(3, -1)
    cfg = AugmentConfig(**{**FULL_FRAME, "size": 64}, **{**PLAIN, "blur_prob": 0.5})
    views = run_views(checker, cfg, 1500, seed=8, device=device)
    contrast = np.abs(np.diff(views[:, 20:44, 20:44, 0], axis=1)).mean((1, 2)) / 200
    blurred = contrast < 0.97
    # sigma ~ U[0.1, 2]: below ~0.35 a Gaussian leaves a 1-pixel checkerboard almost untouched, so the
    # visibly blurred share is 0.5 * P(sigma > 0.35) ~= 0.43.
    assert 0.37 < blurred.mean() < 0.49
    assert contrast.min() < 0.05  # the strongest blurs (sigma ~ 2) flatten it


def test_views_of_one_image_differ_and_seed_determines_them(device):
    image = two_tone((200, 60, 90), (40, 150, 220), size=64)
    cfg = AugmentConfig(size=32)
    a, b = (
        run_views(image, cfg, 20, seed=11, device=device),
        run_views(image, cfg, 20, seed=11, device=device),
    )
    assert np.array_equal(a, b)
    assert not np.array_equal(a, run_views(image, cfg, 20, seed=12, device=device))
    assert np.abs(a[0] - a[1]).mean() > 0.05


def test_eval_view_is_deterministic_centre_crop(device):
    @pipeline_def(batch_size=2, num_threads=1, device_id=0 if device == "gpu" else None)
    def views():
        images = fn.external_source(
            source=lambda: [COORDINATES] * 2, batch=True, layout="HWC", dtype=types.UINT8
        )
        return eval_view(
            images.gpu() if device == "gpu" else images, 64, resize_size=64, **IDENTITY_NORM
        )

    (out,) = views().run()
    out = out.as_cpu() if device == "gpu" else out
    first, second = np.asarray(out[0]), np.asarray(out[1])
    assert np.array_equal(first, second) and first.shape == (64, 64, 3)
    assert abs(first[32, 32, 0] - 128) < 3 and abs(first[32, 32, 1] - 128) < 3  # centred

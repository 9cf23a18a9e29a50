"""The SimCLR view's geometry against TensorFlow's own ops (``tests/goldens/tf_geometry.npz``, written by ``make
goldens`` from tensorflow-cpu 2.21): the crop sampler against ``tf.image.sample_distorted_bounding_box`` as the official
code calls it, and the blur against the official SAME-padded ``gaussian_blur``, both through real DALI pipelines.

Crops: the two-sample Kolmogorov-Smirnov distance of the area and aspect distributions (20,000 draws a side) must
stay below the KS critical value at alpha = 0.001 for two samples of 20,000 (1.95 sqrt(2 / 20000) = 0.0195): two
TensorFlow runs with different seeds pass it, DALI's ``random_resized_crop`` sampler (uniform area, log-uniform
aspect: ``crop_sampler='uniform_area'``) does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types

from simclr_dali.pipeline.augment import (
    AugmentConfig,
    decode_random_crop,
    gaussian_blur,
    resized_crop,
    simclr_view,
)
from simclr_dali.pipeline.view_plan import blur_kernels, crop_window

GOLDEN = np.load(Path(__file__).resolve().parent / "goldens" / "tf_geometry.npz")
KS_THRESHOLD = 0.0195  # the two-sample KS critical value at alpha = 0.001 for 20,000 + 20,000 draws
DRAWS = 20_000
SHAPES = [(224, 224), (32, 32), (375, 500)]  # (H, W) of the images TensorFlow cropped
BATCH = 1000


def ks_statistic(samples: np.ndarray, reference: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    grid = np.sort(np.concatenate([samples, reference]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
    return float(np.abs(cdf(samples) - cdf(reference)).max())


def tf_sizes(height: int, width: int, seed: int = 1) -> np.ndarray:
    """TensorFlow's crop (height, width) draws for an image of height x width, int64 (20000, 2)."""
    return GOLDEN[f"crop_{height}x{width}_seed{seed}"].astype(np.int64)


def area_aspect(sizes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Area fraction and aspect (width / height) of integer crop sizes, in float64."""
    h, w = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    return h * w / (height * width), w / h


def _run_batches(pipe, count: int) -> list[np.ndarray]:
    outputs = []
    while sum(len(o[0]) for o in outputs) < count:
        outputs.append([np.stack([np.asarray(s) for s in out]) for out in pipe.run()])
    return [np.concatenate(parts)[:count] for parts in zip(*outputs)]


def our_windows(
    height: int, width: int, cfg: AugmentConfig, count: int = DRAWS, seed: int = 0
) -> np.ndarray:
    """(y, x, h, w) int64 windows of the product's ``crop_window`` for images of height x width."""

    @pipeline_def(batch_size=BATCH, num_threads=1, device_id=None, seed=seed)
    def windows():
        shape = fn.external_source(
            source=lambda: [np.array([height, width, 3], np.int64)] * BATCH, batch=True
        )
        start, end = crop_window(shape, cfg)
        return start, end

    start, end = _run_batches(windows(), count)
    start, end = np.rint(start).astype(np.int64), np.rint(end).astype(np.int64)
    return np.concatenate([start, end - start], axis=1)


def uniform_area_sizes(height: int, width: int, count: int = DRAWS, seed: int = 0) -> np.ndarray:
    """(h, w) of DALI's own random crop generator (``random_resized_crop``'s sampler) with the paper's ranges."""

    @pipeline_def(batch_size=BATCH, num_threads=1, device_id=None, seed=seed)
    def windows():
        shape = fn.external_source(
            source=lambda: [np.array([height, width, 3], np.int64)] * BATCH, batch=True
        )
        _, size = fn.random_crop_generator(
            shape, random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=100
        )
        return size

    (size,) = _run_batches(windows(), count)
    return size[:, :2].astype(np.int64)


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def windows_and_shape(request):
    height, width = request.param
    return our_windows(height, width, AugmentConfig()), height, width


def test_crop_sampler_matches_tensorflow(windows_and_shape):
    windows, height, width = windows_and_shape
    ours_area, ours_aspect = area_aspect(windows[:, 2:], height, width)
    tf_area, tf_aspect = area_aspect(tf_sizes(height, width), height, width)
    assert ks_statistic(ours_area, tf_area) < KS_THRESHOLD
    assert ks_statistic(ours_aspect, tf_aspect) < KS_THRESHOLD
    assert (
        abs(ours_area.mean() - tf_area.mean()) < 0.006
    )  # ~3 standard errors of the difference of two means


@pytest.mark.parametrize("height,width", [(224, 224), (32, 32)])
def test_threshold_passes_two_tensorflow_runs_and_fails_the_uniform_area_sampler(height, width):
    tf1_area, tf1_aspect = area_aspect(tf_sizes(height, width, seed=1), height, width)
    tf2_area, tf2_aspect = area_aspect(tf_sizes(height, width, seed=2), height, width)
    assert (
        ks_statistic(tf2_area, tf1_area) < KS_THRESHOLD
        and ks_statistic(tf2_aspect, tf1_aspect) < KS_THRESHOLD
    )
    uniform_area, _ = area_aspect(uniform_area_sizes(height, width), height, width)
    assert ks_statistic(uniform_area, tf1_area) > 3 * KS_THRESHOLD


def test_smallest_crop_is_a_tenth_of_the_image_as_in_tensorflow(windows_and_shape):
    """min_object_covered = 0.1 of the whole image: the area floor is 0.1, not area_range's 0.08."""
    windows, height, width = windows_and_shape
    ours_area, _ = area_aspect(windows[:, 2:], height, width)
    tf_area, _ = area_aspect(tf_sizes(height, width), height, width)
    assert ours_area.min() >= 0.1 and tf_area.min() >= 0.1
    if height > 32:  # at 32 px the smallest size that reaches 0.1 is 108 / 1024
        assert ours_area.min() < 0.102 and tf_area.min() < 0.102


def test_crop_corners_follow_tensorflow(windows_and_shape):
    """TensorFlow draws the corner with ``Uniform(H - h)``, in [0, H - h): a crop reaches the bottom (right) edge
    only when it spans the whole height (width); the corners are otherwise uniform."""
    windows, height, width = windows_and_shape
    y, x, h, w = windows.T
    tf_y, tf_x = GOLDEN[f"crop_{height}x{width}_seed1_offsets"].astype(np.int64).T
    tf_h, tf_w = tf_sizes(height, width)[: len(tf_y)].T
    for corner, side, full in (
        (y, h, height),
        (x, w, width),
        (tf_y, tf_h, height),
        (tf_x, tf_w, width),
    ):
        assert (corner >= 0).all() and (
            (corner + side < full) | ((side == full) & (corner == 0))
        ).all()
    # relative position of the corner in its free range: uniform, for ours as for TensorFlow's
    free = (h < height - 1) & (w < width - 1)
    relative = (y[free] + 0.5) / (height - h[free])
    tf_free = (tf_h < height - 1) & (tf_w < width - 1)
    tf_relative = (tf_y[tf_free] + 0.5) / (height - tf_h[tf_free])
    assert abs(relative.mean() - 0.5) < 0.01 and abs(tf_relative.mean() - 0.5) < 0.03


def test_crop_falls_back_to_the_whole_image():
    """No attempt can succeed (aspect 3-4 with areas of at least 0.9 of a square): TensorFlow returns the whole image
    (where DALI's random_resized_crop returns a centre crop)."""
    cfg = AugmentConfig(crop_area=(0.9, 1.0), crop_aspect=(3.0, 4.0))
    windows = our_windows(60, 60, cfg, count=BATCH)
    assert (windows == [0, 0, 60, 60]).all()


COORDINATES = np.stack(
    [*np.meshgrid(np.arange(224), np.arange(224)), np.full((224, 224), 128)], -1
).astype(np.uint8)


def measure_windows(views: np.ndarray, size: int) -> np.ndarray:
    """(x0, y0, w, h) of crops of COORDINATES (R encodes x, G encodes y), from the view's rows/columns 1 and
    size-2 (away from the resampling filter's edge effects): the pixel centres there sit at 1.5 and size-1.5
    output pixels, i.e. (size - 3) / size of the window apart."""
    left, right = views[:, size // 2, 1, 0], views[:, size // 2, size - 2, 0]
    top, bottom = views[:, 1, size // 2, 1], views[:, size - 2, size // 2, 1]
    width, height = (right - left) * size / (size - 3), (bottom - top) * size / (size - 3)
    return np.stack(
        [left - 1.5 * width / size + 0.5, top - 1.5 * height / size + 0.5, width, height], 1
    )


def test_resized_crop_shows_the_window():
    """``resized_crop`` puts the sampled window, and nothing else, in the view (decode-then-crop path)."""
    cfg = AugmentConfig(size=64)

    @pipeline_def(batch_size=200, num_threads=1, device_id=None, seed=3)
    def views():
        images = fn.external_source(
            source=lambda: [COORDINATES] * 200, batch=True, layout="HWC", dtype=types.UINT8
        )
        start, end = crop_window(images.shape(), cfg)
        return resized_crop(images, start, end, cfg), start, end

    view, start, end = _run_batches(views(), 200)
    measured = measure_windows(view.astype(np.float64), 64)
    expected = np.stack(
        [start[:, 1], start[:, 0], end[:, 1] - start[:, 1], end[:, 0] - start[:, 0]], 1
    )
    error = np.abs(measured - expected)
    assert (
        error.max() < 1.5 and error.mean() < 0.5
    )  # uint8 views: the measured edges are rounded to a level


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_view_crops_follow_tensorflow(device):
    """``simclr_view`` (decode-then-crop; the window from the decoded images' shape, on the GPU too): windows
    measured from the pixels of 2000 views of COORDINATES against TensorFlow's 224 px draws, with the alpha = 0.001
    KS bound for 2,000 + 20,000 draws (0.046)."""
    cfg = AugmentConfig(size=64, jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0, flip_prob=0.0)
    cfg = AugmentConfig(
        **{**cfg.__dict__, "mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)}
    )

    @pipeline_def(
        batch_size=500,
        num_threads=1,
        device_id=0 if device == "gpu" else None,
        seed=6,
        enable_conditionals=True,
    )
    def views():
        images = fn.external_source(
            source=lambda: [COORDINATES] * 500, batch=True, layout="HWC", dtype=types.UINT8
        )
        return simclr_view(images.gpu() if device == "gpu" else images, cfg)

    pipe = views()
    view = np.concatenate(
        [
            np.stack(
                [
                    np.asarray(v)
                    for v in (pipe.run()[0].as_cpu() if device == "gpu" else pipe.run()[0])
                ]
            )
            for _ in range(4)
        ]
    )
    measured = measure_windows(np.rint(view.astype(np.float64)), 64)
    area = measured[:, 2] * measured[:, 3] / 224**2
    tf_area, _ = area_aspect(tf_sizes(224, 224), 224, 224)
    assert ks_statistic(area, tf_area) < 0.046


def _jpeg(image: np.ndarray) -> np.ndarray:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=98)
    return np.frombuffer(buffer.getvalue(), np.uint8)


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("sampler", ["tf", "uniform_area"])
def test_roi_decode_crops_follow_the_sampler(sampler, device):
    """``decode_random_crop`` (ROI decode: only the window is decoded) with each sampler: windows measured from
    the pixels of 2000 views of a JPEG of COORDINATES, against TensorFlow's 224 px draws. The KS bound is the
    alpha = 0.001 critical value for 2,000 + 20,000 draws (0.046): the tf sampler passes, uniform_area does not."""
    cfg = AugmentConfig(size=64, crop_sampler=sampler)
    jpeg, count = _jpeg(COORDINATES), 2000

    @pipeline_def(batch_size=500, num_threads=1, device_id=0 if device == "gpu" else None, seed=4)
    def views():
        jpegs = fn.external_source(source=lambda: [jpeg] * 500, batch=True, dtype=types.UINT8)
        view = decode_random_crop(jpegs, cfg, device)
        return view.cpu() if device == "gpu" else view

    (view,) = _run_batches(views(), count)
    measured = measure_windows(view.astype(np.float64), 64)
    area = measured[:, 2] * measured[:, 3] / 224**2
    tf_area, _ = area_aspect(tf_sizes(224, 224), 224, 224)
    distance = ks_statistic(area, tf_area)
    assert distance < 0.046 if sampler == "tf" else distance > 0.046


# --------------------------------------------------------------------------- blur


BLUR_CASES = ["cifar", "imagenet", "imagenet224"]


def _blur_outputs(
    images: np.ndarray, sigmas: np.ndarray, kernel_size: int, padding: str, device: str
) -> np.ndarray:
    """The product's blur (``gaussian_blur``, the view plan's taps: ``blur_kernels``) on ``images`` with TensorFlow's
    recorded sigmas, for the view size whose window is the official ``kernel_size`` (side // 10, made odd)."""
    cfg = AugmentConfig(size=10 * kernel_size, blur_padding=padding)
    assert (
        cfg.blur_window == 2 * (kernel_size // 2) + 1
    )  # the official window: radius int(kernel_size / 2)

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=0 if device == "gpu" else None)
    def blur():
        x = fn.external_source(
            source=lambda: list(images), batch=True, layout="HWC", dtype=types.UINT8
        )
        sigma = fn.external_source(source=lambda: [np.float32(s) for s in sigmas], batch=True)
        out = gaussian_blur(x.gpu() if device == "gpu" else x, *blur_kernels(sigma, cfg), padding)
        return out

    (out,) = blur().run()
    out = out.as_cpu() if device == "gpu" else out
    return np.stack([np.asarray(o) for o in out]).astype(np.float64)


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", BLUR_CASES)
def test_blur_matches_tensorflow_within_one_level(case, device):
    images = GOLDEN[f"images_{GOLDEN[f'blur_{case}_source']}"]
    sigmas, kernel_size = GOLDEN[f"blur_{case}_sigma"], int(GOLDEN[f"blur_{case}_kernel_size"])
    expected = GOLDEN[f"blur_{case}_output"].astype(np.float64)
    images = images[: len(expected)]
    got = _blur_outputs(images, sigmas, kernel_size, "zero", device)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1.0
    assert np.abs(got - expected).mean() < 0.1


def test_reflect_padding_is_not_the_official_blur():
    """The option ``blur_padding='reflect'`` differs from TensorFlow at the borders (zero padding darkens them)."""
    images = GOLDEN["images_imagenet"]
    sigmas, kernel_size = (
        GOLDEN["blur_imagenet224_sigma"],
        int(GOLDEN["blur_imagenet224_kernel_size"]),
    )
    expected = GOLDEN["blur_imagenet224_output"].astype(np.float64)
    got = _blur_outputs(images[: len(expected)], sigmas, kernel_size, "reflect", "cpu")
    border = np.abs(got - expected)[:, [0, -1]].max()
    interior = np.abs(got - expected)[:, 11:-11, 11:-11].max()
    assert border > 20 and interior <= 1.0


def test_roi_decoded_two_views_resume_exactly(small_shards):
    """``roi_decode``: each view decodes only its own window (``decoders.image_slice``); the sampler's seeds are
    DALI uniforms, so a loader restored from a mid-epoch state continues with exactly the same views."""
    from simclr_dali.pipeline.loader import DaliLoader, TwoViews

    directory, _ = small_shards
    make = lambda: DaliLoader(
        directory, 8, TwoViews(AugmentConfig.cifar(roi_decode=True)), train=True, seed=2
    )
    reference = [(v1, v2) for v1, v2 in make()]
    assert all(v1.shape == (8, 3, 32, 32) and not torch.equal(v1, v2) for v1, v2 in reference)
    loader, resumed = make(), []
    for view1, _ in loader:
        resumed.append(view1)
        if len(resumed) == 5:
            state = loader.state_dict()
            break
    restored = make()
    restored.load_state_dict(state)
    resumed += [v1 for v1, _ in restored]
    assert len(resumed) == len(reference) and all(
        torch.equal(a, b) for a, (b, _) in zip(resumed, reference)
    )

"""TensorFlow's own crop sampler and the official SAME-padded Gaussian blur, recorded for the augmentation tests.

Run by ``make goldens`` with the throwaway tensorflow-cpu venv (never a project dependency); writes
``tests/goldens/tf_geometry.npz``:

- ``crop_{H}x{W}_seed{S}``: (20000, 2) crop sizes ``(height, width)`` drawn by
  ``tf.image.sample_distorted_bounding_box`` exactly as the official code's ``crop_and_resize`` calls it
  (google-research/simclr ``tf2/data_util.py``: the whole image as the box, ``min_object_covered=0.1``, aspect (3/4,
  4/3), area (0.08, 1), 100 attempts), for images of 224x224 and 32x32 with global seeds 1 and 2 (two independent
  TensorFlow runs) and 375x500 (H x W) with seed 1; ``crop_{H}x{W}_seed{S}_offsets``: the ``(y, x)`` corners of the
  first 2000 of them;
- ``images_cifar`` (10 x 32 x 32 x 3: one CIFAR-10 image per class) and ``images_imagenet`` (10 x 64 x 64 x 3), uint8,
  from ``images.golden_images()``: the blur's inputs;
- for each blur case ``set``: ``blur_{set}_source`` (which images), ``blur_{set}_kernel_size`` (the official
  ``kernel_size`` argument, ``height // 10`` of the view it stands for), ``blur_{set}_sigma`` (float32, one per
  image) and ``blur_{set}_output`` (float16, in levels 0..255: TensorFlow's float output times 255, clipped as
  ``batch_random_blur`` clips). Cases: ``cifar`` (32 px, kernel_size 3), ``imagenet`` (64 px, kernel_size 6) and
  ``imagenet224`` (the first 5 of those 64 px images with the 224 px view's kernel_size 22: the widest window,
  where the zero padding reaches furthest in).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from images import GOLDENS, golden_images  # noqa: E402

CROP_DRAWS = 20_000
CROP_SEEDS = {(224, 224): (1, 2), (32, 32): (1, 2), (375, 500): (1,)}
CROP_OFFSETS = (
    2000  # corners kept (the sizes decide the area and aspect; a few corners show where crops sit)
)


def official_crop_box(image_shape, seed):
    """The box of google-research/simclr ``crop_and_resize`` (aspect_ratio = width / height = 1 for square views).
    The official code passes no seed (the op then seeds itself from the clock: unrepeatable); an op seed makes the
    same stateful kernel reproducible."""
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], dtype=tf.float32, shape=[1, 1, 4])
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=bbox,
        min_object_covered=0.1,
        aspect_ratio_range=(3.0 / 4, 4.0 / 3.0),
        area_range=(0.08, 1.0),
        max_attempts=100,
        use_image_if_no_bounding_boxes=True,
        seed=seed,
    )
    return begin[0], begin[1], size[0], size[1]


def crop_boxes(height: int, width: int, count: int, seed: int) -> np.ndarray:
    """``count`` boxes (y, x, h, w), eagerly, one image at a time as the official input pipeline calls the op;
    global and op seed ``seed`` make the sequence reproducible (``make goldens`` rewrites the same arrays)."""
    tf.random.set_seed(seed)
    shape = tf.constant([height, width, 3])
    return np.array([[int(v) for v in official_crop_box(shape, seed)] for _ in range(count)])


def official_gaussian_blur(image, kernel_size, sigma, padding="SAME"):
    """The official ``gaussian_blur`` (google-research/simclr tf2/data_util.py, Apache-2.0), the same ops in the same
    order: radius = int(kernel_size / 2), taps exp(-x^2 / (2 sigma^2)) over [-radius, radius] normalised to sum 1,
    one horizontal then one vertical depthwise convolution with ``padding``."""
    radius = tf.cast(kernel_size / 2, dtype=tf.int32)
    kernel_size = radius * 2 + 1
    x = tf.cast(tf.range(-radius, radius + 1), dtype=tf.float32)
    blur_filter = tf.exp(-tf.pow(x, 2.0) / (2.0 * tf.pow(tf.cast(sigma, dtype=tf.float32), 2.0)))
    blur_filter /= tf.reduce_sum(blur_filter)
    channels = tf.shape(image)[-1]
    blur_h = tf.tile(tf.reshape(blur_filter, [1, kernel_size, 1, 1]), [1, 1, channels, 1])
    blur_v = tf.tile(tf.reshape(blur_filter, [kernel_size, 1, 1, 1]), [1, 1, channels, 1])
    batched = tf.expand_dims(image, axis=0)
    blurred = tf.nn.depthwise_conv2d(batched, blur_h, strides=[1, 1, 1, 1], padding=padding)
    blurred = tf.nn.depthwise_conv2d(blurred, blur_v, strides=[1, 1, 1, 1], padding=padding)
    return tf.squeeze(blurred, axis=0)


def blur_golden(images: np.ndarray, kernel_size: int, sigmas: np.ndarray) -> np.ndarray:
    out = []
    for image, sigma in zip(images, sigmas):
        x = tf.image.convert_image_dtype(
            tf.constant(image), tf.float32
        )  # uint8 -> [0, 1], as preprocess_image
        blurred = tf.clip_by_value(official_gaussian_blur(x, kernel_size, float(sigma)), 0.0, 1.0)
        out.append(blurred.numpy() * 255.0)
    return np.stack(out)


def main():
    arrays = {}
    for (height, width), seeds in CROP_SEEDS.items():
        for seed in seeds:
            boxes = crop_boxes(height, width, CROP_DRAWS, seed)
            boxes = boxes.astype(np.uint8 if max(height, width) < 256 else np.int16)
            arrays[f"crop_{height}x{width}_seed{seed}"] = boxes[:, 2:]
            arrays[f"crop_{height}x{width}_seed{seed}_offsets"] = boxes[:CROP_OFFSETS, :2]
    images = golden_images()
    rng = np.random.default_rng(23)
    cifar, imagenet = images["cifar"][::2], images["imagenet"]  # one CIFAR-10 image per class
    arrays["images_cifar"], arrays["images_imagenet"] = cifar, imagenet
    cases = {
        "cifar": ("cifar", 32 // 10),
        "imagenet": ("imagenet", 64 // 10),
        "imagenet224": ("imagenet", 224 // 10),
    }
    for name, (source, kernel_size) in cases.items():
        batch = arrays[f"images_{source}"][: 5 if name == "imagenet224" else None]
        sigmas = rng.uniform(0.1, 2.0, len(batch)).astype(np.float32)
        sigmas[:2] = (0.1, 2.0)  # both ends of the official range
        arrays[f"blur_{name}_source"] = np.array(source)
        arrays[f"blur_{name}_kernel_size"] = np.int32(kernel_size)
        arrays[f"blur_{name}_sigma"] = sigmas
        arrays[f"blur_{name}_output"] = blur_golden(batch, kernel_size, sigmas).astype(np.float16)
    arrays["tensorflow_version"] = np.array(tf.__version__)
    path = GOLDENS / "tf_geometry.npz"
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

"""TensorFlow's own colour ops on the goldens' real images (``make goldens``): tests/goldens/tf_colour_*.npz.

As the official SimCLR code (google-research/simclr, ``tf2/data_util.py``) runs them: on float32 images in
[0, 1] (``tf.image.convert_image_dtype``), with fixed, recorded parameters instead of its random draws.

- ``tf_colour_ops_{cifar,imagenet}.npz``: each single op on each of the 30 images (the ImageNet crops' central
  40x40, to keep the files small), one parameter per image spanning the op's range at s = 0.5 (half the
  images) and s = 1 (the other half): ``adjust_brightness`` (additive: simclrv1's
  ``random_brightness``), ``x * factor`` (simclrv2's multiplicative brightness, the official default),
  ``adjust_contrast``, ``adjust_saturation``, ``adjust_hue`` and ``rgb_to_grayscale`` tiled to 3 channels.
- ``tf_colour_jitter_{cifar,imagenet}.npz``: ``color_jitter_rand``'s composition with recorded orders and
  factors: the four ops in the image's order, ``tf.clip_by_value(0, 1)`` after each; every image at s = 0.5
  and at s = 1, a quarter of the rows with simclrv1's additive brightness.

Outputs are stored as uint8 levels, ``round(255 clip(y, 0, 1))`` (the comparison the tests make is in levels); inputs as
the uint8 arrays TensorFlow saw. Ops are numbered as the official code numbers them: 0 brightness, 1 contrast,
2 saturation, 3 hue; an order row lists the ops in the order applied.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from images import GOLDENS, golden_images

SEED = 23
SINGLE_OP_SIDE = (
    40  # the ImageNet crops' central square the single ops run on (the jitter sees all 64x64)
)
OPS = ("brightness", "contrast", "saturation", "hue")


def ranges(strength: float) -> dict[str, tuple[float, float]]:
    """The official draws' ranges (``color_jitter``: 0.8 s, 0.8 s, 0.8 s, 0.2 s)."""
    b, c, s, h = 0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength
    return {
        "brightness_v2": (
            max(1.0 - b, 0.0),
            1.0 + b,
        ),  # random_brightness, impl='simclrv2': x * factor
        "brightness_v1": (
            -b,
            b,
        ),  # impl='simclrv1': tf.image.random_brightness(max_delta=b), additive
        "contrast": (1.0 - c, 1.0 + c),
        "saturation": (1.0 - s, 1.0 + s),
        "hue": (-h, h),
    }


def brightness(image, value: float, impl: str):
    return image * value if impl == "simclrv2" else tf.image.adjust_brightness(image, value)


def apply_op(op: int, image, value: float, impl: str):
    if op == 0:
        return brightness(image, value, impl)
    if op == 1:
        return tf.image.adjust_contrast(image, value)
    if op == 2:
        return tf.image.adjust_saturation(image, value)
    return tf.image.adjust_hue(image, value)


def levels(image) -> np.ndarray:
    """uint8 levels of a float image, clipped to [0, 1] first (as the official code clips after every op)."""
    return np.round(np.clip(np.asarray(image, np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def as_float(image: np.ndarray):
    return tf.image.convert_image_dtype(tf.constant(image), tf.float32)


def single_ops(images: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each op on each image; ``strength`` per image: s = 0.5 for the first half of each set, 1 for the rest,
    parameters evenly spaced over the range (endpoints included), in a shuffled order."""
    n = len(images)
    strength = np.where(np.arange(n) % 2 == 0, 0.5, 1.0)
    out = {"images": images, "strength": strength.astype(np.float32)}
    for name in ("brightness_v1", "brightness_v2", "contrast", "saturation", "hue"):
        values = np.empty(n, np.float32)
        for s in (0.5, 1.0):
            rows = np.flatnonzero(strength == s)
            lo, hi = ranges(s)[name]
            values[rows] = rng.permutation(np.linspace(lo, hi, len(rows)))
        op = OPS.index(name.split("_")[0])
        impl = "simclrv1" if name == "brightness_v1" else "simclrv2"
        out[f"{name}_value"] = values
        out[name] = np.stack(
            [
                levels(apply_op(op, as_float(image), float(v), impl))
                for image, v in zip(images, values)
            ]
        )
    out["grayscale"] = np.stack(
        [levels(tf.tile(tf.image.rgb_to_grayscale(as_float(x)), [1, 1, 3])) for x in images]
    )
    return out


def jitter(images: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``color_jitter_rand`` with recorded draws: every image at s = 0.5 and s = 1; values[:, op] is op's draw."""
    rows = [(i, s) for s in (0.5, 1.0) for i in range(len(images))]
    index = np.array([i for i, _ in rows], np.int32)
    strength = np.array([s for _, s in rows], np.float32)
    impl_v1 = np.arange(len(rows)) % 4 == 3
    orders = np.stack([rng.permutation(4) for _ in rows]).astype(np.int32)
    values = np.empty((len(rows), 4), np.float32)
    outputs = []
    for row, (i, s) in enumerate(rows):
        impl = "simclrv1" if impl_v1[row] else "simclrv2"
        r = ranges(s)
        for op, name in enumerate(("brightness_v1" if impl_v1[row] else "brightness_v2", *OPS[1:])):
            values[row, op] = rng.uniform(*r[name])
        x = as_float(images[i])
        for op in orders[row]:
            x = tf.clip_by_value(apply_op(int(op), x, float(values[row, op]), impl), 0.0, 1.0)
        outputs.append(levels(x))
    return {
        "images": images,
        "index": index,
        "strength": strength,
        "impl_v1": impl_v1,
        "orders": orders,
        "values": values,
        "outputs": np.stack(outputs),
    }


def main():
    rng = np.random.default_rng(SEED)
    sources = golden_images()
    for kind, images in sources.items():
        margin = (images.shape[1] - SINGLE_OP_SIDE) // 2 if kind == "imagenet" else 0
        centre = images[:, margin : images.shape[1] - margin, margin : images.shape[2] - margin]
        for name, make, inputs in (("ops", single_ops, centre), ("jitter", jitter, images)):
            path = GOLDENS / f"tf_colour_{name}_{kind}.npz"
            np.savez_compressed(
                path, tf_version=np.array(tf.__version__), **make(np.ascontiguousarray(inputs), rng)
            )
            print(f"{path.name}: {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()

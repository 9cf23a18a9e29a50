"""The official SimCLR crop window: TensorFlow's ``sample_distorted_bounding_box``, compiled into the view's plan.

The official ``crop_and_resize`` draws each view's window with TensorFlow's kernel (an integer height drawn
uniformly, so the area's density falls as ~1/sqrt(a); no crop below 0.1 of the image; the whole image after 100
failed attempts), which no DALI operator reproduces. ``tf_crop_window`` is that kernel's arithmetic, run per sample
on the CPU inside the view's plan operator (``view_plan.crop_window``; DALI's ``numba_function``, float32 and round-
half-even like ``lrintf``) from the image's shape and two DALI uniforms (checkpointed with the pipeline, so a
resumed loader draws the same crops), and returns absolute ``(start, end)`` in (y, x) for ``fn.resize``'s ROI or ROI
decoding. The kernel step by step: docs/design.md (*The crop window*)."""

from __future__ import annotations

import numpy as np

SEED_UNIFORMS = 2  # DALI uniforms per sample: 24 bits each of the sample's 48-bit seed

# splitmix64 (Steele, Lea & Flood 2014): the sampler's own stream, seeded per sample by DALI's uniforms. Drawing
# TensorFlow's up to 4 x 100 numbers per view with DALI's random operator costs ~14 us per sample on the CPU
# (measured, DALI 2.4, 2 cores: 14 us for 400 floats); two seed floats cost what any 2-float draw does.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def crop_params(cfg) -> np.ndarray:
    """The compiled sampler's parameters for ``cfg`` (an ``augment.AugmentConfig``): area range (fractions of the
    image), aspect range (width / height), the coverage of the whole image a crop needs (``min_object_covered``)
    and the number of attempts."""
    (area_lo, area_hi), (aspect_lo, aspect_hi) = cfg.crop_area, cfg.crop_aspect
    return np.array(
        [area_lo, area_hi, aspect_lo, aspect_hi, cfg.crop_min_covered, cfg.crop_attempts],
        np.float32,
    )


def tf_crop_window(start, end, shape, seed, p):
    """One sample: ``start``, ``end`` (2,) (y, x) of the crop in an image of ``shape`` (H, W, ...), from the
    seed uniforms ``seed`` (``SEED_UNIFORMS`` in [0, 1)) and the parameters ``p`` (``crop_params``). Mirrors
    ``GenerateRandomCrop`` and ``SatisfiesOverlapConstraints`` step by step, in float32 where TensorFlow computes
    in float, ``lrintf`` as round half to even; TensorFlow's ``RandFloat()`` and ``Uniform(n)`` (in [0, n)) are
    read from 24-bit uniforms of the sample's splitmix64 stream. One function body (Numba compiles it alone)."""
    image_h, image_w = int(shape[0]), int(shape[1])
    min_area = np.float32(np.float32(p[0] * np.float32(image_w)) * np.float32(image_h))
    max_area = np.float32(np.float32(p[1] * np.float32(image_w)) * np.float32(image_h))
    image_area = np.float32(image_w * image_h)
    state = (np.uint64(seed[0] * np.float32(16777216.0)) << np.uint64(24)) | np.uint64(
        seed[1] * np.float32(16777216.0)
    )
    u = np.empty(4, np.float32)  # this attempt's aspect, height, y, x uniforms
    crop_y, crop_x, crop_h, crop_w = (
        0,
        0,
        image_h,
        image_w,
    )  # TensorFlow's fallback: the whole image
    for _ in range(int(p[5])):
        for k in range(4):
            state = state + _GAMMA
            z = (state ^ (state >> np.uint64(30))) * _MIX1
            z = (z ^ (z >> np.uint64(27))) * _MIX2
            z = z ^ (z >> np.uint64(31))
            u[k] = np.float32(z >> np.uint64(40)) * np.float32(1.0 / 16777216.0)
        aspect = np.float32(np.float32(u[0] * np.float32(p[3] - p[2])) + p[2])
        height = int(np.rint(np.sqrt(np.float32(min_area / aspect))))
        max_height = int(np.rint(np.sqrt(np.float32(max_area / aspect))))
        if int(np.rint(np.float32(np.float32(max_height) * aspect))) > image_w:
            max_height = int(
                (image_w + 0.5 - np.float64(np.float32(1e-7))) / np.float64(aspect)
            )  # double, as TF
            if int(np.rint(np.float32(np.float32(max_height) * aspect))) > image_w:
                max_height -= 1
        max_height = min(max_height, image_h)
        height = min(height, max_height)
        if height < max_height:
            span = max_height - height + 1
            height += min(int(u[1] * np.float32(span)), span - 1)
        width = int(np.rint(np.float32(np.float32(height) * aspect)))
        area = np.float32(width * height)
        if area < min_area:  # rounding: one step up, then one down
            height += 1
            width = int(np.rint(np.float32(np.float32(height) * aspect)))
            area = np.float32(width * height)
        if area > max_area:
            height -= 1
            width = int(np.rint(np.float32(np.float32(height) * aspect)))
            area = np.float32(width * height)
        if (
            area < min_area
            or area > max_area
            or width > image_w
            or height > image_h
            or width <= 0
            or height <= 0
        ):
            continue
        if (
            area < np.float32(1.0) or np.float32(area / image_area) < p[4]
        ):  # the box is the whole image
            continue
        crop_y = (
            min(int(u[2] * np.float32(image_h - height)), image_h - height - 1)
            if height < image_h
            else 0
        )
        crop_x = (
            min(int(u[3] * np.float32(image_w - width)), image_w - width - 1)
            if width < image_w
            else 0
        )
        crop_h, crop_w = height, width
        break
    start[0], start[1] = crop_y, crop_x
    end[0], end[1] = crop_y + crop_h, crop_x + crop_w

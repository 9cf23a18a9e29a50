"""The colour stage of a SimCLR view on DALI's CPU backend as one compiled operator (``numba_function``).

On the CPU, DALI runs every operator sample by sample with a fixed cost of about a microsecond per sample
and operator, however little it computes; the colour stage written with DALI's own operators (``augment``'s
GPU form: a mean, the per-sample matrix arithmetic, ``coord_transform``, two conditionals with their split
and merge, two ``color_space_conversion`` s) is ~45 operators per view, which at 32 px cost more than the
pixels. Here the whole stage is one per-sample function compiled by Numba and run by DALI's
``numba_function`` operator (no Python, no GIL, inside DALI's thread pool): from the view's uniforms
(``augment.ViewDraws``) it draws the coins and factors, builds the same affine colour map
(``augment.colour_map``: ``y = b c H x + b (1 - c) H m``, ``H`` DALI's ``hsv`` matrix, ``m`` the channel
means), saturates once, takes the luma (0.299, 0.587, 0.114) when the grayscale coin says so, and writes
the pixels mirrored when the flip coin says so. uint8 HWC in, uint8 HWC out (same shape).

``colour_params(cfg)`` is the operator's second input: the coins' probabilities and the factors' ranges,
so that one compiled function serves every configuration. The layout of the uniforms is ``ViewDraws``'s.
"""

from __future__ import annotations

import functools

import numpy as np
from nvidia.dali import fn, types

from .augment import HSV_BASIS, UNIFORMS, jitter_ranges  # augment imports this module where it is used

# Where each draw sits in a view's uniforms (compile-time constants for Numba)
U_JITTER, U_GRAY, U_FLIP = (UNIFORMS.index(name) for name in ("jitter", "gray", "flip"))
U_BRIGHTNESS, U_CONTRAST, U_SATURATION, U_HUE = (
    UNIFORMS.index(name) for name in ("brightness", "contrast", "saturation", "hue")
)

_BASIS = np.ascontiguousarray(np.stack(HSV_BASIS), dtype=np.float32)  # a compile-time constant for Numba


def colour_params(cfg) -> np.ndarray:
    """The compiled function's parameters for ``cfg`` (an ``augment.AugmentConfig``): probabilities of the
    jitter, grayscale and flip; (low, span) of brightness, contrast, saturation and hue (degrees); 1 for a
    per-channel contrast pivot, 0 for one mean over all channels."""
    ranges = jitter_ranges(cfg)
    values = [cfg.jitter_prob, cfg.gray_prob, cfg.flip_prob]
    for name in ("brightness", "contrast", "saturation", "hue"):
        lo, hi = ranges[name]
        values += [lo, hi - lo]
    return np.array([*values, 1.0 if cfg.contrast_per_channel else 0.0], np.float32)


def _colour_view(out, image, u, p):
    """One view: ``out`` (H, W, 3) uint8 from ``image`` (H, W, 3) uint8, uniforms ``u``, parameters ``p``."""
    h, w = image.shape[0], image.shape[1]
    m00 = m11 = m22 = np.float32(1.0)
    m01 = m02 = m10 = m12 = m20 = m21 = np.float32(0.0)
    t0 = t1 = t2 = np.float32(0.0)
    if u[U_JITTER] < p[0]:
        b = p[3] + p[4] * u[U_BRIGHTNESS]
        c = p[5] + p[6] * u[U_CONTRAST]
        s = p[7] + p[8] * u[U_SATURATION]
        hue = (p[9] + p[10] * u[U_HUE]) * np.float32(np.pi / 180.0)
        sc, ss = s * np.cos(hue), s * np.sin(hue)
        k0, k1, k2 = _BASIS[0], _BASIS[1], _BASIS[2]
        a0 = a1 = a2 = np.float32(0.0)  # channel sums, then means (the contrast pivot)
        for y in range(h):
            for x in range(w):
                a0 += np.float32(image[y, x, 0])
                a1 += np.float32(image[y, x, 1])
                a2 += np.float32(image[y, x, 2])
        n = np.float32(h * w)
        a0, a1, a2 = a0 / n, a1 / n, a2 / n
        if p[11] == 0.0:
            a0 = a1 = a2 = (a0 + a1 + a2) / np.float32(3.0)
        bc, bo = b * c, b * (np.float32(1.0) - c)
        hm = np.empty((3, 3), np.float32)
        for i in range(3):
            for j in range(3):
                hm[i, j] = k0[i, j] + sc * k1[i, j] + ss * k2[i, j]
        m00, m01, m02 = bc * hm[0, 0], bc * hm[0, 1], bc * hm[0, 2]
        m10, m11, m12 = bc * hm[1, 0], bc * hm[1, 1], bc * hm[1, 2]
        m20, m21, m22 = bc * hm[2, 0], bc * hm[2, 1], bc * hm[2, 2]
        t0 = bo * (hm[0, 0] * a0 + hm[0, 1] * a1 + hm[0, 2] * a2)
        t1 = bo * (hm[1, 0] * a0 + hm[1, 1] * a1 + hm[1, 2] * a2)
        t2 = bo * (hm[2, 0] * a0 + hm[2, 1] * a1 + hm[2, 2] * a2)
    gray = u[U_GRAY] < p[1]
    flip = u[U_FLIP] < p[2]
    start, step = (w - 1, -1) if flip else (0, 1)
    zero, top, half = np.float32(0.0), np.float32(255.0), np.float32(0.5)
    l0, l1, l2 = np.float32(0.299), np.float32(0.587), np.float32(0.114)
    for y in range(h):
        for x in range(w):
            r, g, b_ = np.float32(image[y, x, 0]), np.float32(image[y, x, 1]), np.float32(image[y, x, 2])
            # saturate once, round half up (as DALI's float -> uint8 conversion)
            o0 = np.floor(min(max(m00 * r + m01 * g + m02 * b_ + t0, zero), top) + half)
            o1 = np.floor(min(max(m10 * r + m11 * g + m12 * b_ + t1, zero), top) + half)
            o2 = np.floor(min(max(m20 * r + m21 * g + m22 * b_ + t2, zero), top) + half)
            if gray:
                o0 = o1 = o2 = np.floor(min(l0 * o0 + l1 * o1 + l2 * o2 + half, top))
            xo = start + step * x
            out[y, xo, 0] = np.uint8(o0)
            out[y, xo, 1] = np.uint8(o1)
            out[y, xo, 2] = np.uint8(o2)


def _same_shape(outs, ins):
    """numba_function's setup: the output has the image's shape."""
    for i in range(len(outs[0])):
        for d in range(3):
            outs[0][i][d] = ins[0][i][d]


@functools.cache
def _compiled():
    """The DALI operator, compiled once per process (~3 s) and shared by every pipeline: Numba compiles
    when the operator object is made, and one object may be called in any number of pipelines."""
    from nvidia.dali.plugin.numba import NumbaFunction  # imports Numba (~2.5 s): only where it is used

    return NumbaFunction(
        run_fn=_colour_view,
        setup_fn=_same_shape,
        out_types=[types.UINT8],
        in_types=[types.UINT8, types.FLOAT, types.FLOAT],
        outs_ndim=[3],
        ins_ndim=[3, 1, 1],
        device="cpu",
    )


def compiled_colour_stage(images, uniforms, cfg):
    """Colour jitter (p), grayscale (p) and flip (p) of a batch of uint8 HWC ``images`` on the CPU, one
    operator: ``uniforms`` are the views' ``ViewDraws.uniform``."""
    out = _compiled()(images, uniforms, types.Constant(colour_params(cfg)))
    return fn.reshape(out, layout="HWC")  # numba_function's outputs carry no layout (the reshape copies nothing)

"""The colour stage of a SimCLR view on DALI's CPU backend as one compiled operator (``numba_function``).

It computes the official code's ``random_color_jitter`` with ``tf.image`` semantics (brightness, contrast,
saturation and hue in a random order per image with a clip after each, then grayscale, then the flip, float
between the ops and rounded to uint8 once) from the view's uniforms (``colour_spec``, ``view_plan``);
the tests compare it with TensorFlow's own ops. Why one compiled operator: DALI's CPU executor costs about a
microsecond per sample and operator however little the operator computes, and a random order with a clip after
each op is no single affine map; here the whole stage is one per-sample function compiled by Numba and run in
DALI's thread pool (no Python, no GIL). ``colour_params(cfg)`` is its second input, so one compiled function
serves every configuration. The ops one by one: docs/design.md (*The view*).
"""

from __future__ import annotations

import functools

import numpy as np
from numba.extending import (
    register_jitable,
)  # imports Numba (~2.5 s): this module is imported where it is used
from nvidia.dali import fn, types

from .colour_spec import (  # noqa: F401 (colour_params is part of this form's interface)
    GRAY_WEIGHTS,
    P_ADDITIVE,
    P_PER_CHANNEL,
    U_BRIGHTNESS,
    U_FLIP,
    U_GRAY,
    U_JITTER,
    U_ORDER,
    UNIFORMS,
    colour_params,
)

G0, G1, G2 = (np.float32(w) for w in GRAY_WEIGHTS)
N_DRAWS = len(UNIFORMS)


@register_jitable(inline="always")
def _brightness(flat, value, additive):
    """tf.image.adjust_brightness (``additive``: x + value) or the multiplicative form (x * value), clipped."""
    zero, one = np.float32(0.0), np.float32(1.0)
    if additive:
        for j in range(flat.shape[0]):
            flat[j] = min(max(flat[j] + value, zero), one)
    else:
        for j in range(flat.shape[0]):
            flat[j] = min(max(flat[j] * value, zero), one)


@register_jitable(inline="always")
def _contrast(x, value, per_channel):
    """tf.image.adjust_contrast: (x - mean) * value + mean, the mean per channel or over all, clipped."""
    h, w = x.shape[0], x.shape[1]
    zero, one = np.float32(0.0), np.float32(1.0)
    s0 = s1 = s2 = 0.0  # float64 sums: the mean is exact enough at any size
    for y in range(h):
        for i in range(w):
            s0 += x[y, i, 0]
            s1 += x[y, i, 1]
            s2 += x[y, i, 2]
    n = h * w
    m0, m1, m2 = np.float32(s0 / n), np.float32(s1 / n), np.float32(s2 / n)
    if not per_channel:
        m0 = m1 = m2 = np.float32((s0 + s1 + s2) / (3 * n))
    for y in range(h):
        for i in range(w):
            x[y, i, 0] = min(max((x[y, i, 0] - m0) * value + m0, zero), one)
            x[y, i, 1] = min(max((x[y, i, 1] - m1) * value + m1, zero), one)
            x[y, i, 2] = min(max((x[y, i, 2] - m2) * value + m2, zero), one)


@register_jitable(inline="always")
def _saturation(x, value):
    """tf.image.adjust_saturation: S' = min(S value, 1) in HSV, H and V kept, clipped."""
    zero, one = np.float32(0.0), np.float32(1.0)
    for y in range(x.shape[0]):
        for i in range(x.shape[1]):
            r, g, b = x[y, i, 0], x[y, i, 1], x[y, i, 2]
            hi, lo = max(r, max(g, b)), min(r, min(g, b))
            if hi > lo:  # grey (and black) pixels have S = 0: unchanged
                chroma = (
                    hi - lo
                )  # S' = min(S f, 1) with S = chroma / hi: the scale is min(f, hi / chroma)
                scale = hi / chroma if value * chroma > hi else value
                x[y, i, 0] = min(max(hi - (hi - r) * scale, zero), one)
                x[y, i, 1] = min(max(hi - (hi - g) * scale, zero), one)
                x[y, i, 2] = min(max(hi - (hi - b) * scale, zero), one)


@register_jitable(inline="always")
def _hue(x, value):
    """tf.image.adjust_hue: the hue shifted by ``value`` turns (mod 1) in HSV, S and V kept."""
    zero, one, six = np.float32(0.0), np.float32(1.0), np.float32(6.0)
    shift = value * six
    for y in range(x.shape[0]):
        for i in range(x.shape[1]):
            r, g, b = x[y, i, 0], x[y, i, 1], x[y, i, 2]
            hi, lo = max(r, max(g, b)), min(r, min(g, b))
            if hi == lo:
                continue
            chroma = hi - lo
            if hi == r:  # hue in [0, 6): the hexcone's six sectors
                hue = (g - b) / chroma
            elif hi == g:
                hue = (b - r) / chroma + np.float32(2.0)
            else:
                hue = (r - g) / chroma + np.float32(4.0)
            hue += shift
            hue -= six * np.floor(hue / six)  # to [0, 6] (6 is 0: the channel curves agree there)
            # each channel's place between min and max at that hue (TF's hv_range_to_rgb)
            fr = min(max(abs(hue - np.float32(3.0)) - one, zero), one)
            fg = min(max(np.float32(2.0) - abs(hue - np.float32(2.0)), zero), one)
            fb = min(max(np.float32(2.0) - abs(hue - np.float32(4.0)), zero), one)
            x[y, i, 0] = lo + chroma * fr
            x[y, i, 1] = lo + chroma * fg
            x[y, i, 2] = lo + chroma * fb


@register_jitable(inline="always")
def _jitter(x, u, p):
    """The four jitter ops in the order of their keys (smallest first), each with its clip."""
    keys = np.empty(4, np.float32)
    for op in range(4):
        keys[op] = u[U_ORDER + op]
    for _ in range(4):  # the op with the smallest remaining key, then the next
        op = 0
        for other in range(1, 4):
            if keys[other] < keys[op]:
                op = other
        keys[op] = np.float32(2.0)
        value = p[3 + 2 * op] + p[4 + 2 * op] * u[U_BRIGHTNESS + op]
        if op == 0:
            _brightness(x.reshape(x.shape[0] * x.shape[1] * 3), value, p[P_ADDITIVE] != 0.0)
        elif op == 1:
            _contrast(x, value, p[P_PER_CHANNEL] != 0.0)
        elif op == 2:
            _saturation(x, value)
        else:
            _hue(x, value)


def _colour_view(out, image, u, p):
    """One view: ``out`` (H, W, 3) uint8 from ``image`` (H, W, 3) uint8, uniforms ``u``, parameters ``p``.
    The ops are the helpers above, inlined into this one compiled function by Numba (``register_jitable``)."""
    h, w = image.shape[0], image.shape[1]
    u = u[
        u.shape[0] - N_DRAWS :
    ]  # the draws are the vector's last elements (view_plan: after the crop's seed)
    x = np.empty((h, w, 3), np.float32)
    flat, pixels = (
        x.reshape(h * w * 3),
        image.reshape(h * w * 3),
    )  # (image: C-contiguous, as DALI passes it)
    for j in range(h * w * 3):
        flat[j] = np.float32(pixels[j]) / np.float32(255.0)
    if u[U_JITTER] < p[0]:
        _jitter(x, u, p)
    gray = u[U_GRAY] < p[1]
    flip = u[U_FLIP] < p[2]
    start, step = (w - 1, -1) if flip else (0, 1)
    top, half = np.float32(255.0), np.float32(0.5)
    for y in range(h):
        for i in range(w):
            o0, o1, o2 = x[y, i, 0], x[y, i, 1], x[y, i, 2]
            if gray:
                o0 = o1 = o2 = G0 * o0 + G1 * o1 + G2 * o2
            xo = start + step * i
            out[y, xo, 0] = np.uint8(
                np.int32(o0 * top + half)
            )  # round half up, once (values in [0, 1])
            out[y, xo, 1] = np.uint8(np.int32(o1 * top + half))
            out[y, xo, 2] = np.uint8(np.int32(o2 * top + half))


def _same_shape(outs, ins):
    """numba_function's setup: the output has the image's shape."""
    for i in range(len(outs[0])):
        for d in range(3):
            outs[0][i][d] = ins[0][i][d]


@functools.cache
def _compiled():
    """The DALI operator, compiled once per process (~3 s) and shared by every pipeline: Numba compiles
    when the operator object is made, and one object may be called in any number of pipelines."""
    from nvidia.dali.plugin.numba import NumbaFunction

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
    operator: ``uniforms`` are the views' ``ViewPlan.uniform`` (the draws are its last ``len(UNIFORMS)``)."""
    out = _compiled()(images, uniforms, types.Constant(colour_params(cfg)))
    return fn.reshape(
        out, layout="HWC"
    )  # numba_function's outputs carry no layout (the reshape copies nothing)

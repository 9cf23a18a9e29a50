"""Every per-sample CPU decision of one SimCLR view in one compiled DALI operator: draws, crop window, blur taps.

DALI runs a CPU operator sample by sample with a fixed cost of about a microsecond per sample however little it
computes, and a view's decisions were ~40 small operators (scaling the draws, the coins, the blur's radius and
taps, the crop window's inputs): on the GPU graph they were most of the host's work per image. Here one
``numba_function`` computes, per sample, from the image's shape (``fn.peek_image_shape`` of the encoded image,
so nothing waits for the decoder) and one vector of ``PLAN_UNIFORMS`` uniforms (one DALI random operator,
checkpointed with the pipeline):
- ``start``, ``end``: the official crop window (``crop.tf_crop_window``, the same function body, seeded by the
  vector's first ``SEED_UNIFORMS`` elements); the colour stage reads its draws from the vector's last
  ``len(UNIFORMS)`` elements (``colour_spec``'s layout): the plan's ``uniform`` is the vector itself;
- ``mirror`` (int32 (1,), 1 = flip) and ``blur`` (int32 (3,): the coin, then where the radius's taps start in the
  window and how many there are: a CPU graph slices them out and blurs only the blurred views);
- ``kernel_h`` (1, W) and ``kernel_v`` (W, 1): the view's separable Gaussian over the official window
  ``W = cfg.blur_window``, radius ceil(4 sigma) capped at the window's, normalised, zero outside the radius; the
  identity (a 1 in the middle) when the view is not blurred, so a GPU graph can filter every view without a
  per-sample branch.
(DALI's ``numba_function`` takes at most 6 outputs: hence the packed ``blur``.)
Arithmetic in float32 as DALI's operators did it (``lo + span * u``; ``exp(x^2 (-0.5 / sigma^2))``), so the
views are those of the operators it replaces.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode

from .colour_spec import UNIFORMS, jitter_ranges
from .crop import SEED_UNIFORMS, crop_params, tf_crop_window

PLAN_UNIFORMS = SEED_UNIFORMS + len(UNIFORMS)  # the crop's seed, then the colour stage's draws
_U_FLIP, _U_BLUR, _U_SIGMA = (
    SEED_UNIFORMS + UNIFORMS.index(name) for name in ("flip", "blur", "sigma")
)
_P_FLIP = (
    6  # after crop_params' 6 values: the flip and blur probabilities, the sigma's low and span
)


def plan_params(cfg) -> np.ndarray:
    """The operator's parameters for ``cfg`` (an ``augment.AugmentConfig``): ``crop_params`` (6 values), then the
    flip and blur probabilities and the blur sigma's (low, span)."""
    sigma_lo, sigma_hi = jitter_ranges(cfg)["sigma"]
    extra = [cfg.flip_prob, cfg.blur_prob, sigma_lo, np.float32(sigma_hi) - np.float32(sigma_lo)]
    return np.concatenate([crop_params(cfg), np.array(extra, np.float32)])


def gaussian_taps(kernel, sigma, radius_max):
    """``kernel`` (W,) float32 = the Gaussian of ``sigma`` over [-r, r], r = min(ceil(4 sigma), ``radius_max``),
    normalised, zero outside; returns r. Float32 as DALI's arithmetic operators computed it."""
    radius = min(int(np.ceil(np.float32(sigma * np.float32(4.0)))), radius_max)
    scale = np.float32(np.float32(-0.5) / np.float32(sigma * sigma))
    total = np.float32(0.0)
    for k in range(kernel.shape[0]):
        kernel[k] = np.float32(0.0)
    for x in range(-radius, radius + 1):
        weight = np.float32(np.exp(np.float32(np.float32(x * x) * scale)))
        kernel[radius_max + x] = weight
        total += weight
    for x in range(-radius, radius + 1):
        kernel[radius_max + x] = np.float32(kernel[radius_max + x] / total)
    return radius


@functools.cache
def _compiled(window_dtype, window: int):
    """The plan operator for crop windows of ``window_dtype`` and a blur window of ``window`` taps, compiled once
    per process (Numba compiles when the operator object is made)."""
    import numba
    from nvidia.dali.plugin.numba import NumbaFunction  # imports Numba: only where it is used

    crop = numba.njit(tf_crop_window)
    taps = numba.njit(gaussian_taps)
    radius_max, seeds = window // 2, SEED_UNIFORMS
    u_flip, u_blur, u_sigma, p_flip = _U_FLIP, _U_BLUR, _U_SIGMA, _P_FLIP

    def plan(start, end, mirror, blur, kernel_h, kernel_v, shape, u, p):
        crop(start, end, shape, u[:seeds], p)
        mirror[0] = 1 if u[u_flip] < p[p_flip] else 0
        blurred = u[u_blur] < p[p_flip + 1]
        kernel = np.zeros(2 * radius_max + 1, np.float32)
        radius = 0
        if blurred:
            radius = taps(
                kernel,
                np.float32(p[p_flip + 2] + np.float32(p[p_flip + 3] * u[u_sigma])),
                radius_max,
            )
        else:
            kernel[radius_max] = np.float32(1.0)
        for k in range(2 * radius_max + 1):
            kernel_h[0, k] = kernel[k]
            kernel_v[k, 0] = kernel[k]
        blur[0] = 1 if blurred else 0
        blur[1] = radius_max - radius
        blur[2] = 2 * radius + 1

    def setup(outs, ins):
        for i in range(len(outs[0])):
            outs[0][i][0] = 2
            outs[1][i][0] = 2
            outs[2][i][0] = 1
            outs[3][i][0] = 3
            outs[4][i][0] = 1
            outs[4][i][1] = 2 * radius_max + 1
            outs[5][i][0] = 2 * radius_max + 1
            outs[5][i][1] = 1

    f32 = types.FLOAT
    return NumbaFunction(
        run_fn=plan,
        setup_fn=setup,
        out_types=[window_dtype, window_dtype, types.INT32, types.INT32, f32, f32],
        in_types=[types.INT64, f32, f32],
        outs_ndim=[1, 1, 1, 1, 2, 2],
        ins_ndim=[1, 1, 1],
        device="cpu",
    )


@dataclass
class ViewPlan:
    """The plan of one view (CPU ``DataNode`` s; the module docstring says what each is). ``uniform``: the vector
    of uniforms the plan was made from, whose last ``len(UNIFORMS)`` elements are the colour stage's draws."""

    uniform: DataNode
    start: DataNode
    end: DataNode
    mirror: DataNode
    blur_taps: DataNode
    kernel_h: DataNode
    kernel_v: DataNode

    @property
    def blur(self) -> DataNode:
        """The blur coin as the 0-d integer a DALI ``if`` needs (one more CPU operator: only the CPU graph's)."""
        return self.blur_taps[0]

    def sliced_kernels(self):
        """The (1, taps) and (taps, 1) kernels of the radius's taps, cut out of the window-wide ones."""
        return sliced_kernels(
            self.kernel_h, self.kernel_v, self.blur_taps[1:2], self.blur_taps[2:3]
        )


def view_plan(cfg, shape=None, uniform=None, window_dtype=types.FLOAT, seed=None) -> ViewPlan:
    """The plan of each view of images of ``shape`` (an INT64 (H, W, C) CPU node: ``fn.peek_image_shape`` of the
    JPEGs or decoded images' ``.shape()``; None: no crop, e.g. DALI's own crop sampler). By default one DALI
    uniform vector of ``PLAN_UNIFORMS`` per sample; tests may pass the crop's ``seed`` (``SEED_UNIFORMS``) or the
    colour stage's draws ``uniform`` (``len(UNIFORMS)``) instead (the other part is then fixed at 0.5).
    ``window_dtype``: FLOAT for ``fn.resize``'s ROI, INT32 for ``decoders.image_slice``."""
    if shape is None:
        shape = types.Constant(np.array([1, 1, 3], np.int64), dtype=types.INT64)
    if uniform is None and seed is None:
        draws = fn.random.uniform(range=[0.0, 1.0], shape=[PLAN_UNIFORMS])
    else:
        fixed = lambda n: types.Constant(np.full(n, 0.5, np.float32))  # noqa: E731
        draws = fn.cat(
            fixed(SEED_UNIFORMS) if seed is None else seed,
            fixed(len(UNIFORMS)) if uniform is None else uniform,
        )
    outputs = _compiled(window_dtype, cfg.blur_window)(
        shape, draws, types.Constant(plan_params(cfg))
    )
    return ViewPlan(draws, *outputs)


@functools.cache
def _compiled_taps(window: int):
    """The blur taps alone from given sigmas (``blur_kernels``), compiled once per window: the plan's
    ``gaussian_taps``."""
    import numba
    from nvidia.dali.plugin.numba import NumbaFunction

    taps = numba.njit(gaussian_taps)
    radius_max = window // 2

    def kernels(kernel_h, kernel_v, blur, sigma):
        kernel = np.zeros(2 * radius_max + 1, np.float32)
        radius = taps(kernel, sigma[0], radius_max)
        for k in range(2 * radius_max + 1):
            kernel_h[0, k] = kernel[k]
            kernel_v[k, 0] = kernel[k]
        blur[0], blur[1], blur[2] = 1, radius_max - radius, 2 * radius + 1

    def setup(outs, ins):
        for i in range(len(outs[0])):
            outs[0][i][0] = 1
            outs[0][i][1] = 2 * radius_max + 1
            outs[1][i][0] = 2 * radius_max + 1
            outs[1][i][1] = 1
            outs[2][i][0] = 3

    return NumbaFunction(
        run_fn=kernels,
        setup_fn=setup,
        out_types=[types.FLOAT, types.FLOAT, types.INT32],
        in_types=[types.FLOAT],
        outs_ndim=[2, 2, 1],
        ins_ndim=[1],
        device="cpu",
    )


def sliced_kernels(kernel_h, kernel_v, tap_start, tap_count):
    """The (1, taps) and (taps, 1) kernels of the radius's taps, cut out of the window-wide ones."""
    cut = {"normalized_anchor": False, "normalized_shape": False}
    return (
        fn.slice(kernel_h, tap_start, tap_count, axes=[1], **cut),
        fn.slice(kernel_v, tap_start, tap_count, axes=[0], **cut),
    )


def blur_kernels(sigma, cfg):
    """The blur's (1, taps) and (taps, 1) kernels for per-sample ``sigma`` (float32 scalars) and ``cfg``'s window:
    the plan operator's taps (``gaussian_taps``) for given sigmas (tests compare them with TensorFlow's blur)."""
    kernel_h, kernel_v, blur = _compiled_taps(cfg.blur_window)(fn.reshape(sigma, shape=[1]))
    return sliced_kernels(kernel_h, kernel_v, blur[1:2], blur[2:3])


def crop_window(shape, cfg, seed=None, dtype=types.FLOAT):
    """The official crop window of each image of ``shape`` (an INT64 (H, W, C) CPU node: ``fn.peek_image_shape`` of
    the JPEGs, or decoded images' ``.shape()``) -> ``(start, end)``, absolute (y, x) CPU nodes of ``dtype`` (FLOAT
    for ``fn.resize``'s ROI, INT32 for ``decoders.image_slice``): the window of the view's plan operator
    (``view_plan`` above, which the views use). ``seed``: ``SEED_UNIFORMS`` uniforms in [0, 1) per sample (default
    drawn, checkpointed with the pipeline; tests pass their own)."""
    plan = view_plan(cfg, shape, seed=seed, window_dtype=dtype)
    return plan.start, plan.end

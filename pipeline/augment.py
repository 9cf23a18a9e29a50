"""SimCLR augmentations as DALI graph fragments: one definition for the ``cpu`` and ``gpu`` backends.

A view is the official SimCLR code's ``crop -> flip -> colour jitter (p) -> grayscale (p) -> blur (p) -> normalise``
(``AugmentConfig``), with ``tf.image`` semantics that the tests compare with TensorFlow's own outputs. The functions
take and return DALI ``DataNode`` s inside a pipeline built with ``enable_conditionals=True``, so a sample only pays
for the operators its coins choose; per-sample work that DALI would spread over dozens of operators runs as one
compiled operator per view: the view's plan (``view_plan``: its draws, its crop window from the encoded image's
shape, its blur taps), the colour stage (``colour_cpu`` on the CPU, one Triton kernel, ``colour_gpu``, on the GPU).
Each stage, how it matches TensorFlow and why it is built so: docs/design.md (*The view*)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from nvidia.dali import fn, types

from .augment_config import (  # noqa: F401 (re-exported: the view's parameters live there)
    BLUR_PADDINGS,
    BRIGHTNESS_IMPLS,
    CROP_SAMPLERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
)
from .colour_spec import COINS, GRAY_WEIGHTS, ORDER_KEYS, UNIFORMS, jitter_ranges  # noqa: F401 (re-exported)
from .view_plan import ViewPlan, view_plan

# The share of images the mixed decoder sends to the hardware JPEG decoder (A100/H100) by default, as in NVIDIA's
# ResNet-50 DALI example (TrainConfig.hw_decoder_load). Its buffer paddings are per DALI thread (one device buffer
# and one pinned host buffer each), so they are sized to the data (``gpu_decoder_sizing``), not to ImageNet's
# largest image for every set.
HW_DECODER_LOAD = 0.65
GPU_DECODER = {"hw_decoder_load": HW_DECODER_LOAD}
DALI_DEFAULT_HOST_PADDING = 8 * 2**20  # DALI's default host_memory_padding (device: 16 MiB)
_GPU_DECODER_SIZING: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "gpu_decoder_sizing", default=None
)


def gpu_decoder_sizing(largest_image: tuple[int, int] | None) -> dict:
    """nvJPEG's preallocation for data whose largest image is (width, height): DALI's defaults where they
    already hold it decoded (8 MiB of pinned host, 16 MiB of device memory per thread: CIFAR's 32 px, photos up
    to ~2.8 megapixels), else one decoded RGB image (rounded up to MiB) per buffer and the size hints (ImageNet's
    largest, 5,980 x 6,430: 111 MiB). Unknown: the defaults. A larger image only costs a reallocation."""
    if largest_image is None:
        return {}
    width, height = largest_image
    decoded = width * height * 3
    if decoded <= DALI_DEFAULT_HOST_PADDING:
        return {}
    padding = -(-decoded // 2**20) * 2**20
    return {
        "device_memory_padding": padding,
        "host_memory_padding": padding,
        "preallocate_width_hint": width,
        "preallocate_height_hint": height,
    }


@contextlib.contextmanager
def gpu_decoder_sized_for(
    largest_image: tuple[int, int] | None, hw_decoder_load: float = HW_DECODER_LOAD
) -> Iterator[dict]:
    """While a pipeline's graph is defined inside: its GPU decoders get ``gpu_decoder_sizing(largest_image)`` and
    send ``hw_decoder_load`` of the images to the hardware decoder."""
    sizing = {**gpu_decoder_sizing(largest_image), "hw_decoder_load": hw_decoder_load}
    token = _GPU_DECODER_SIZING.set(sizing)
    try:
        yield sizing
    finally:
        _GPU_DECODER_SIZING.reset(token)


def _decoder_args(device: str) -> dict:
    if device != "gpu":
        return {"device": "cpu"}
    return {"device": "mixed", **GPU_DECODER, **(_GPU_DECODER_SIZING.get() or {})}


def decode(jpegs, device: str):
    """JPEG bytes -> uint8 RGB HWC. ``device='gpu'`` uses DALI's "mixed" decoder (nvJPEG, with the
    hardware JPEG decoder where the GPU has one); ``'cpu'`` uses libjpeg-turbo."""
    return fn.decoders.image(jpegs, output_type=types.RGB, **_decoder_args(device))


def resized_crop(images, start, end, cfg: AugmentConfig):
    """The window ``[start, end)`` (absolute (y, x) per sample: ``view_plan.crop_window``) of each image, resized to
    ``cfg.size`` square: bicubic without antialiasing, as the official code's ``tf.image.resize``. (DALI resamples
    the window inside the whole image: its edge pixels' filter taps may reach just outside it, where TensorFlow,
    having cut the crop out first, repeats the crop's own edge.)"""
    return fn.resize(
        images,
        size=[cfg.size, cfg.size],
        roi_start=start,
        roi_end=end,
        roi_relative=False,
        interp_type=types.INTERP_CUBIC,
        antialias=False,
    )


def decode_random_crop(jpegs, cfg: AugmentConfig, device: str, plan: ViewPlan | None = None):
    """JPEG bytes -> the random resized crop of ``simclr_view`` (the same sampler, ``cfg.crop_sampler``), decoding
    only the crop's region (ROI decode), uint8 RGB HWC of side ``cfg.size``. ``tf``: the window from the encoded
    image's shape (``fn.peek_image_shape``), decoded by ``decoders.image_slice``; ``uniform_area``: DALI's
    ``decoders.image_random_crop``."""
    if cfg.crop_sampler == "uniform_area":
        region = fn.decoders.image_random_crop(
            jpegs,
            output_type=types.RGB,
            random_area=list(cfg.crop_area),
            random_aspect_ratio=list(cfg.crop_aspect),
            num_attempts=cfg.crop_attempts,
            **_decoder_args(device),
        )
    else:
        if plan is None:
            plan = view_plan(cfg, fn.peek_image_shape(jpegs), window_dtype=types.INT32)
        region = fn.decoders.image_slice(
            jpegs,
            start=plan.start,
            end=plan.end,
            axis_names="HW",
            output_type=types.RGB,
            **_decoder_args(device),
        )
    return fn.resize(
        region, size=[cfg.size, cfg.size], interp_type=types.INTERP_CUBIC, antialias=False
    )


def gaussian_blur(images, kernel_h, kernel_v, padding: str = "zero"):
    """Separable Gaussian blur as two ``fn.filter`` passes (horizontal, then vertical, as the official
    ``gaussian_blur``), CPU or GPU images, with per-sample (1, taps) and (taps, 1) CPU kernels (``view_plan``'s, or
    ``view_plan.blur_kernels`` of given sigmas); borders padded with zeros (``padding='zero'``, the official
    ``padding='SAME'``) or reflected without repeating the edge (``'reflect'``, reflect-101). uint8 HWC -> float
    HWC (0..255, not rounded)."""
    border = {"zero": "constant", "reflect": "reflect_101"}[padding]
    horizontal = fn.filter(images, kernel_h, dtype=types.FLOAT, border=border)
    return fn.filter(horizontal, kernel_v, border=border)


def simclr_view(images, cfg: AugmentConfig, output_dtype=types.FLOAT, shape=None):
    """One augmented view of decoded uint8 HWC ``images`` -> normalised ``output_dtype`` HWC of side ``cfg.size``.
    ``shape``: the images' (H, W, C) as a CPU node for the ``tf`` crop sampler: ``fn.peek_image_shape`` of the
    JPEGs (the loader: the view's CPU work need not wait for the decoder), default ``images.shape()``."""
    if cfg.crop_sampler == "uniform_area":
        view = fn.random_resized_crop(
            images,
            size=[cfg.size, cfg.size],
            random_area=list(cfg.crop_area),
            random_aspect_ratio=list(cfg.crop_aspect),
            num_attempts=cfg.crop_attempts,
            interp_type=types.INTERP_CUBIC,
            antialias=False,  # as the official code's tf.image.resize (bicubic, no antialiasing)
        )
        return augment_cropped(view, cfg, output_dtype)
    plan = view_plan(cfg, images.shape() if shape is None else shape)
    return augment_cropped(resized_crop(images, plan.start, plan.end, cfg), cfg, output_dtype, plan)


def roi_view(jpegs, cfg: AugmentConfig, device: str, output_dtype=types.FLOAT, shape=None):
    """One augmented view of JPEG bytes, decoding only its crop's region (``decode_random_crop``). ``shape``:
    ``fn.peek_image_shape(jpegs)`` if the caller has it (one per image serves both views)."""
    if cfg.crop_sampler == "uniform_area":
        return augment_cropped(decode_random_crop(jpegs, cfg, device), cfg, output_dtype)
    shape = fn.peek_image_shape(jpegs) if shape is None else shape
    plan = view_plan(cfg, shape, window_dtype=types.INT32)
    return augment_cropped(decode_random_crop(jpegs, cfg, device, plan), cfg, output_dtype, plan)


# On the CPU the colour stage (jitter, grayscale, flip) is one compiled operator (``colour_cpu``); True runs the
# GPU's form there instead (``colour_gpu``'s Triton kernel, under the Triton interpreter: for tests).
colour_by_gpu_form = False


def colour_stage(view, cfg: AugmentConfig, draws: ViewPlan):
    """Colour jitter (p), grayscale (p) and the flip (p) of uint8 HWC views -> (views, mirror), with
    ``tf.image`` semantics (``colour_cpu``'s docstring). The flip commutes with every colour op: on the CPU
    the compiled stage (``colour_cpu``) writes the pixels mirrored and ``mirror`` is 0; the GPU's kernel
    (``colour_gpu``) leaves the flip to the final normalisation: ``mirror`` is the per-sample coin."""
    if view.device == "cpu" and not colour_by_gpu_form:
        from .colour_cpu import compiled_colour_stage

        return compiled_colour_stage(view, draws.uniform, cfg), 0
    from .colour_gpu import kernel_colour_stage

    return kernel_colour_stage(view, draws.uniform, cfg), draws.mirror


def augment_cropped(
    view, cfg: AugmentConfig, output_dtype=types.FLOAT, plan: ViewPlan | None = None
):
    """Everything of a view after its crop: colour jitter, grayscale, blur, flip + normalisation, with the draws
    of ``plan`` (the view's ``view_plan``; default: a plan without a crop). On the GPU every view goes through
    the blur's two filters (an unblurred view's kernel is the identity: exact), so no per-sample branch costs
    CPU operators; on the CPU only the blurred views are filtered, with only their radius's taps."""
    plan = view_plan(cfg) if plan is None else plan
    view, mirror = colour_stage(view, cfg, plan)
    if cfg.blur_prob <= 0:
        return normalize(view, cfg.mean, cfg.std, mirror=mirror, dtype=output_dtype)
    if view.device == "gpu":
        view = gaussian_blur(view, plan.kernel_h, plan.kernel_v, cfg.blur_padding)
        return normalize(view, cfg.mean, cfg.std, mirror=mirror, dtype=output_dtype)
    kernels = plan.sliced_kernels()
    if plan.blur:  # the blurred view is float: each branch ends in its own normalisation
        blurred = gaussian_blur(view, *kernels, cfg.blur_padding)
        view = normalize(blurred, cfg.mean, cfg.std, mirror=mirror, dtype=output_dtype)
    else:
        view = normalize(view, cfg.mean, cfg.std, mirror=mirror, dtype=output_dtype)
    return view


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


def eval_resize(size: int) -> int:
    """The shorter side an evaluation image is resized to before its centre crop of ``size``: ``size / 0.875``
    (256 for 224, the standard ImageNet protocol); images of <= 64 px (CIFAR-like sets, stored at their
    size) are not enlarged: ``size`` itself."""
    return size if size <= 64 else round(size / 0.875)


def eval_view(
    images,
    size: int,
    resize_size: int | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    output_dtype=types.FLOAT,
):
    """Evaluation view: resize the shorter side to ``resize_size`` (default ``eval_resize(size)``), centre
    crop ``size``, normalise."""
    resize_size = resize_size or eval_resize(size)
    images = fn.resize(images, resize_shorter=resize_size, interp_type=types.INTERP_CUBIC)
    images = fn.crop(images, crop=[size, size])
    return normalize(images, mean, std, dtype=output_dtype)

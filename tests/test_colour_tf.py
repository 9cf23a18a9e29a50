"""The colour stage against TensorFlow's own ops (tests/goldens/tf_colour_*.npz, made by ``make goldens`` from
``tf.image.adjust_brightness/contrast/saturation/hue``, ``rgb_to_grayscale`` and the official
``color_jitter_rand`` composition), in both forms: the CPU's compiled operator (``pipeline/colour_cpu.py``,
through a real DALI CPU pipeline) and the GPU's Triton kernel (``pipeline/colour_gpu.py``: on the CPU under
the Triton interpreter, and marked gpu on CUDA). The recorded parameters and orders are fed as the views'
uniforms; outputs must be within 1 level of TensorFlow's on >= 99.9% of the uint8 values.

Also the invariants of the HSV ops that hold whatever the implementation: saturation 0 leaves V (the max
channel) in every channel, a hue shift of 1/3 turn maps red to green and keeps each pixel's min and max, and
the clip after each op of the jitter (a case where clipping once, at the end, gives another image)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types

from simclr_dali.pipeline.augment import ORDER_KEYS, UNIFORMS, AugmentConfig, jitter_ranges

ROOT = Path(__file__).resolve().parents[1]
GOLDENS = ROOT / "tests" / "goldens"
OPS = ("brightness", "contrast", "saturation", "hue")
NO_JITTER_AMOUNTS = {op: 0.0 for op in OPS}  # each op's range collapses to its identity
# The colour stage's forms: the CPU's compiled operator, the GPU's kernel under the Triton interpreter (CPU
# tensors), the GPU's kernel on CUDA.
FORMS = [
    "cpu",
    pytest.param(
        "kernel",
        marks=pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1"
        ),
    ),
    pytest.param("gpu", marks=pytest.mark.gpu),
]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is that run")
@pytest.mark.slow
def test_the_gpu_kernel_under_the_triton_interpreter():
    """The kernel form's tests of this file, in a fresh process with TRITON_INTERPRET=1 (it is read when triton
    is first imported, and other test modules may have imported it here already)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        __file__,
        "-k",
        "kernel and not interpreter",
    ]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"{summary}\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary and "deselected" in summary, summary


def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDENS / f"tf_colour_{name}.npz") as data:
        return dict(data)


def stage_cfg(**overrides) -> AugmentConfig:
    """A colour-stage-only view: no flip, no blur, identity normalisation is not needed (the stage is run alone)."""
    return AugmentConfig(
        **{"flip_prob": 0.0, "blur_prob": 0.0, "gray_prob": 0.0, "jitter_prob": 1.0, **overrides}
    )


def uniforms_for(
    cfg: AugmentConfig, values: dict[str, float], order=(0, 1, 2, 3), gray=False
) -> np.ndarray:
    """The uniforms that make ``cfg``'s colour stage draw ``values`` (op -> its drawn value) in ``order``
    (the ops, as applied), with the jitter's coin heads and the grayscale coin as ``gray``."""
    u = np.full(len(UNIFORMS), 0.5, np.float64)
    u[UNIFORMS.index("jitter")] = 0.0 if cfg.jitter_prob > 0 else 0.99
    u[UNIFORMS.index("gray")] = 0.0 if gray else 0.99
    u[UNIFORMS.index("flip")] = 0.99
    ranges = jitter_ranges(cfg)
    for op, value in values.items():
        lo, hi = ranges[op]
        u[UNIFORMS.index(op)] = 0.5 if hi == lo else (value - lo) / (hi - lo)
    for position, op in enumerate(order):
        u[UNIFORMS.index(ORDER_KEYS[op])] = (position + 0.5) / 4
    assert ((0 <= u) & (u <= 1)).all()
    return u.astype(np.float32)


def _constant(batch):
    return lambda: (
        batch
    )  # (a source that takes an argument is given the iteration number: bind by value)


def run_stage(images, uniforms, cfg: AugmentConfig, form: str) -> np.ndarray:
    """``augment.colour_stage`` of uint8 ``images`` with per-view ``uniforms`` in ``form`` -> uint8 (N, H, W, 3)."""
    import simclr_dali.pipeline.augment as augment

    device = "gpu" if form == "gpu" else "cpu"

    @pipeline_def(
        batch_size=len(images),
        num_threads=1,
        device_id=0 if device == "gpu" else None,
        enable_conditionals=True,
    )
    def stage():
        x = fn.external_source(
            source=_constant(list(images)), batch=True, layout="HWC", dtype=types.UINT8
        )
        u = fn.external_source(source=_constant(list(uniforms)), batch=True, dtype=types.FLOAT)
        view, _ = augment.colour_stage(
            x.gpu() if device == "gpu" else x, cfg, augment.view_plan(cfg, uniform=u)
        )
        return view

    previous, augment.colour_by_gpu_form = augment.colour_by_gpu_form, form == "kernel"
    try:
        pipe = stage()
        pipe.build()
    finally:
        augment.colour_by_gpu_form = previous
    (out,) = pipe.run()
    out = out.as_cpu() if device == "gpu" else out
    return np.stack([np.asarray(out[i]) for i in range(len(out))])


def assert_within_one_level(got: np.ndarray, expected: np.ndarray, share: float = 0.999):
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert got.shape == expected.shape
    assert (diff <= 1).mean() >= share, (
        f"{(diff > 1).mean():.4%} of values > 1 level off, max {diff.max()}"
    )


KINDS = ("cifar", "imagenet")


@pytest.fixture(params=FORMS)
def form(request) -> str:
    return request.param


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", ["brightness_v2", "brightness_v1", "contrast", "saturation", "hue"])
def test_single_op_is_tensorflows(op, kind, form):
    data = golden(f"ops_{kind}")
    name = op.split("_")[0]
    impl = "simclrv1" if op == "brightness_v1" else "simclrv2"
    cfg = stage_cfg(
        **{**NO_JITTER_AMOUNTS, name: AugmentConfig.__dataclass_fields__[name].default},
        brightness_impl=impl,
    )
    uniforms = [uniforms_for(cfg, {name: v}) for v in data[f"{op}_value"]]
    got = run_stage(data["images"], uniforms, cfg, form)
    assert_within_one_level(got, data[op])
    assert (
        np.abs(got.astype(int) - data["images"]).max() > 10
    )  # the op did something (no identity passes)


@pytest.mark.parametrize("kind", KINDS)
def test_grayscale_is_tensorflows_to_one_level(kind, form):
    data = golden(f"ops_{kind}")
    cfg = stage_cfg(jitter_prob=0.0, gray_prob=1.0)
    got = run_stage(
        data["images"], [uniforms_for(cfg, {}, gray=True)] * len(data["images"]), cfg, form
    )
    assert_within_one_level(got, data["grayscale"], share=1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_jitter_with_recorded_orders_is_tensorflows(kind, form):
    data = golden(f"jitter_{kind}")
    got = np.empty_like(data["outputs"])
    for v1 in (False, True):
        rows = np.flatnonzero(data["impl_v1"] == v1)
        cfg = stage_cfg(
            brightness_impl="simclrv1" if v1 else "simclrv2"
        )  # s = 1: its ranges hold s = 0.5's
        uniforms = [
            uniforms_for(cfg, dict(zip(OPS, data["values"][r])), data["orders"][r]) for r in rows
        ]
        got[rows] = run_stage(data["images"][data["index"][rows]], uniforms, cfg, form)
    assert_within_one_level(got, data["outputs"])


def test_goldens_need_the_clip_after_each_op_and_the_order():
    """The goldens can tell the official composition from near misses: clipping once at the end, or a fixed
    order, puts far more than 0.1% of the values more than 1 level off (checked with a float64 reference of
    the ops, itself within 1 level of TensorFlow's)."""
    data = golden("jitter_cifar")
    outputs = {"official": [], "clip once": [], "fixed order": []}
    for r, i in enumerate(data["index"]):
        x = data["images"][i].astype(np.float64) / 255
        additive = bool(data["impl_v1"][r])
        for name, order, clip in (
            ("official", data["orders"][r], True),
            ("clip once", data["orders"][r], False),
            ("fixed order", (0, 1, 2, 3), True),
        ):
            y = x
            for op in order:
                y = reference_op(int(op), y, float(data["values"][r, op]), additive)
                y = np.clip(y, 0, 1) if clip else y
            outputs[name].append(np.floor(np.clip(y, 0, 1) * 255 + 0.5))
    expected = data["outputs"].astype(np.float64)
    assert_within_one_level(np.stack(outputs["official"]), expected)
    for name in ("clip once", "fixed order"):
        assert (np.abs(np.stack(outputs[name]) - expected) > 1).mean() > 0.01, name


# --------------------------------------------------------------------------- a float64 reference of the four ops


def reference_op(op: int, x: np.ndarray, value: float, additive: bool = False) -> np.ndarray:
    """TF's op ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue) on float64 RGB in [0, 1], unclipped, by
    the textbook HSV round trip (numpy: a reference independent of the stages' closed forms)."""
    if op == 0:
        return x + value if additive else x * value
    if op == 1:
        mean = x.mean((0, 1))
        return (x - mean) * value + mean
    hue, sat, val = rgb_to_hsv(x)
    if op == 2:
        sat = np.clip(sat * value, 0, 1)
    else:
        hue = (hue + value) % 1.0
    return hsv_to_rgb(hue, sat, val)


def rgb_to_hsv(x):
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v, lo = x.max(-1), x.min(-1)
    c = v - lo
    safe = np.where(c > 0, c, 1)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = np.where(c > 0, (h / 6) % 1.0, 0.0)
    return h, np.where(v > 0, c / np.where(v > 0, v, 1), 0.0), v


def hsv_to_rgb(h, s, v):
    i = np.floor(h * 6)
    f = h * 6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(int) % 6
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], -1)


# --------------------------------------------------------------------------- invariants


def _pixels(rng, count=4096):
    """Random colours, plus pure primaries, greys, black and white."""
    extremes = np.array(
        [[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0], [255, 255, 255], [128, 128, 128]]
    )
    colours = np.concatenate([extremes, rng.integers(0, 256, (count - len(extremes), 3))]).astype(
        np.uint8
    )
    return colours.reshape(64, 64, 3)


def test_saturation_zero_gives_the_max_channel_in_every_channel(form):
    image = _pixels(np.random.default_rng(0))
    cfg = stage_cfg(**{**NO_JITTER_AMOUNTS, "saturation": 1.0}, jitter_strength=1.0)  # range [0, 2]
    (got,) = run_stage([image], [uniforms_for(cfg, {"saturation": 0.0})], cfg, form)
    assert np.array_equal(got, np.repeat(image.max(-1, keepdims=True), 3, -1))


def test_hue_third_of_a_turn_maps_red_to_green_and_keeps_min_and_max(form):
    image = _pixels(np.random.default_rng(1))
    cfg = stage_cfg(
        **{**NO_JITTER_AMOUNTS, "hue": 0.4}, jitter_strength=1.0
    )  # range [-0.4, 0.4] turns
    images = [image, image]
    uniforms = [uniforms_for(cfg, {"hue": 1 / 3}), uniforms_for(cfg, {"hue": -0.27})]
    third, other = run_stage(images, uniforms, cfg, form)
    assert (
        list(third[0, 0]) == [0, 255, 0]
        and list(third[0, 1]) == [0, 0, 255]
        and list(third[0, 2]) == [255, 0, 0]
    )
    for got in (third, other):
        assert np.array_equal(got.max(-1), image.max(-1)) and np.array_equal(
            got.min(-1), image.min(-1)
        )
    # a third of a turn permutes the channels exactly: (r, g, b) -> (b, r, g)
    assert np.array_equal(third, image[..., [2, 0, 1]])


def test_the_jitter_clips_after_each_op(form):
    """Brightness x 1.8 then contrast x 0.2: clipped in between, a bright pixel ends near the (clipped) mean;
    unclipped it would keep its relative height above it. The stage must give the first."""
    image = np.zeros((8, 8, 3), np.uint8)
    image[:4] = 200
    image[4:] = 40
    cfg = stage_cfg(
        **{**NO_JITTER_AMOUNTS, "brightness": 0.8, "contrast": 0.8}, jitter_strength=1.0
    )
    (got,) = run_stage(
        [image],
        [uniforms_for(cfg, {"brightness": 1.8, "contrast": 0.2}, order=(0, 1, 2, 3))],
        cfg,
        form,
    )
    bright, dark = min(200 * 1.8, 255.0), 40 * 1.8
    mean = (bright + dark) / 2
    clipped_each = np.floor(
        np.array([(bright - mean) * 0.2 + mean, (dark - mean) * 0.2 + mean]) + 0.5
    )
    unclipped_mean = (360 + 72) / 2
    clipped_once = np.floor(
        np.clip(
            [
                (360 - unclipped_mean) * 0.2 + unclipped_mean,
                (72 - unclipped_mean) * 0.2 + unclipped_mean,
            ],
            0,
            255,
        )
        + 0.5
    )
    assert np.abs(clipped_each - clipped_once).max() > 5  # the case tells them apart
    assert np.abs(got[0, 0].astype(float) - clipped_each[0]).max() <= 1
    assert np.abs(got[7, 0].astype(float) - clipped_each[1]).max() <= 1


def reference_stage(image: np.ndarray, u: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """float64 reference of one view's colour stage from its uniforms: the jitter (p) in the order of its keys,
    clipped after each op; grayscale (p); rounded once; the flip (p)."""
    at = {name: float(u[i]) for i, name in enumerate(UNIFORMS)}
    ranges = jitter_ranges(cfg)
    x = image.astype(np.float64) / 255
    if at["jitter"] < cfg.jitter_prob:
        for op in sorted(range(4), key=lambda op: at[ORDER_KEYS[op]]):
            lo, hi = ranges[OPS[op]]
            value = lo + (hi - lo) * at[OPS[op]]
            if op == 1 and not cfg.contrast_per_channel:
                x = (x - x.mean()) * value + x.mean()
            else:
                x = reference_op(op, x, value, cfg.brightness_impl == "simclrv1")
            x = np.clip(x, 0, 1)
    if at["gray"] < cfg.gray_prob:
        x = np.repeat(x @ np.array([0.2989, 0.5870, 0.1140]), 3).reshape(x.shape)
    x = np.floor(np.clip(x * 255, 0, 255) + 0.5)
    return x[:, ::-1] if at["flip"] < cfg.flip_prob else x


@pytest.mark.parametrize(
    "overrides",
    [{}, {"contrast_per_channel": False}, {"brightness_impl": "simclrv1", "jitter_strength": 0.5}],
)
def test_stage_over_every_coin_is_the_reference(overrides, form):
    """Every combination of the three coins (jitter, grayscale, flip) with random factors and orders, on
    non-square images, against the float64 reference; the flip is the stage's ``mirror`` where it returns one."""
    import simclr_dali.pipeline.augment as augment

    rng = np.random.default_rng(2)
    cfg = stage_cfg(jitter_prob=0.5, gray_prob=0.5, flip_prob=0.5, **overrides)
    uniforms, images = [], []
    for coins in np.ndindex(2, 2, 2):  # jitter, gray, flip: 0 = heads (u < p), 1 = tails
        for _ in range(3):
            u = rng.uniform(0, 1, len(UNIFORMS)).astype(np.float32)
            u[:3] = [0.25 if tails == 0 else 0.75 for tails in coins]
            uniforms.append(u)
            images.append(
                rng.integers(0, 256, (14, 23, 3), dtype=np.uint8) // np.array([1, 2, 4], np.uint8)
            )
    got = run_stage_mirrored(images, uniforms, cfg, form)
    for image, u, view in zip(images, uniforms, got):
        expected = reference_stage(image, u, cfg)
        assert view.shape == image.shape
        assert (
            np.abs(view - expected).max() <= 1.0
        )  # float32 against float64 at a rounding boundary: one level
        assert (np.abs(view - expected) > 0).mean() < 0.01
    assert augment.UNIFORMS[:3] == ("jitter", "gray", "flip")


def run_stage_mirrored(images, uniforms, cfg: AugmentConfig, form: str) -> list[np.ndarray]:
    """``colour_stage`` then the identity normalisation with the stage's ``mirror`` -> float arrays in 0..255."""
    import simclr_dali.pipeline.augment as augment

    device = "gpu" if form == "gpu" else "cpu"

    @pipeline_def(
        batch_size=len(images),
        num_threads=1,
        device_id=0 if device == "gpu" else None,
        enable_conditionals=True,
    )
    def stage():
        x = fn.external_source(
            source=_constant(list(images)), batch=True, layout="HWC", dtype=types.UINT8
        )
        u = fn.external_source(source=_constant(list(uniforms)), batch=True, dtype=types.FLOAT)
        view, mirror = augment.colour_stage(
            x.gpu() if device == "gpu" else x, cfg, augment.view_plan(cfg, uniform=u)
        )
        return augment.normalize(view, (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), mirror=mirror)

    previous, augment.colour_by_gpu_form = augment.colour_by_gpu_form, form == "kernel"
    try:
        pipe = stage()
        pipe.build()
    finally:
        augment.colour_by_gpu_form = previous
    (out,) = pipe.run()
    out = out.as_cpu() if device == "gpu" else out
    return [np.asarray(out[i]) for i in range(len(out))]


def test_tied_order_keys_run_the_ops_in_their_listed_order(form):
    """Equal order keys (a float32 tie: rare, but millions of views meet some) give brightness, contrast,
    saturation, hue in that order, each once, in both forms."""
    rng = np.random.default_rng(3)
    cfg = stage_cfg()
    images, uniforms = [], []
    for ties in ([0, 1, 2, 3], [0, 1], [2, 3], [1, 2, 3]):
        u = rng.uniform(0.05, 0.95, len(UNIFORMS)).astype(np.float32)
        u[:3] = [0.0, 0.99, 0.99]  # jitter heads, no grayscale, no flip
        u[[UNIFORMS.index(ORDER_KEYS[op]) for op in ties]] = 0.5
        uniforms.append(u)
        images.append(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8))
    for image, u, got in zip(images, uniforms, run_stage(images, uniforms, cfg, form)):
        assert np.abs(got - reference_stage(image, u, cfg)).max() <= 1


def test_the_dali_batch_runs_on_dalis_stream_one_launch_per_shape(monkeypatch):
    """``dl_tensor_python_function``'s body with the stream functions mocked: on GPU data it wraps DALI's current
    stream (``PythonFunction.current_stream().ptr``) as a torch ``ExternalStream`` on the data's device and runs
    every launch inside it (no host sync, ordered after the crop); one launch per shape of view, whose results
    go back in the samples' order."""
    import types as pytypes

    import torch
    from nvidia.dali.ops._operators.python_function import PythonFunction

    from simclr_dali.pipeline import colour_gpu
    from simclr_dali.pipeline.colour_spec import colour_params

    events, inside = [], []
    monkeypatch.setattr(colour_gpu, "_on_gpu", lambda tensor: True)
    monkeypatch.setattr(
        PythonFunction, "current_stream", staticmethod(lambda: pytypes.SimpleNamespace(ptr=0xDA11))
    )
    monkeypatch.setattr(
        torch.cuda,
        "ExternalStream",
        lambda ptr, device=None: events.append(("external", ptr, device)) or "dali",
    )

    class Entered:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            inside.append(self.stream)

        def __exit__(self, *exc):
            inside.pop()
            return False

    monkeypatch.setattr(torch.cuda, "stream", Entered)

    def launch(images, uniforms, params):
        events.append(("launch", tuple(images.shape), list(inside)))
        return images + 1

    monkeypatch.setattr(colour_gpu, "colour_batch", launch)
    rng = np.random.default_rng(0)
    shapes = [(4, 4, 3), (2, 6, 3), (4, 4, 3)]
    images = [torch.from_numpy(rng.integers(0, 200, s, dtype=np.uint8)) for s in shapes]
    uniforms = [torch.full((15,), 0.5) for _ in shapes]
    out = colour_gpu._dali_batch(colour_params(stage_cfg()), images, uniforms)
    assert events[0] == ("external", 0xDA11, images[0].device)
    launches = [e for e in events if e[0] == "launch"]
    assert [(e[1], e[2]) for e in launches] == [((2, 4, 4, 3), ["dali"]), ((1, 2, 6, 3), ["dali"])]
    for image, result in zip(images, out):
        assert torch.equal(torch.from_dlpack(result), image + 1)

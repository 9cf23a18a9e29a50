"""The colour stage of a SimCLR view on the GPU: one Triton kernel over the batch, inside the DALI pipeline.

Same semantics, uniforms and parameters as the CPU's compiled stage (``colour_cpu``), the flip left to the final
normalisation. Why a kernel of our own: DALI's colour operators are a linear map in YIQ, not ``tf.image``'s HSV
hexcone, and a per-image order with a clip after each op is no affine map; Triton because it is one launch per
batch (one program per image, two passes for the contrast's mean), already a dependency, and testable on the CPU
under ``TRITON_INTERPRET=1`` (decided on paper: no GPU was available). It runs through DALI's
``dl_tensor_python_function`` on DALI's own CUDA stream, with no host synchronisation. The alternatives'
estimated costs, its compiled resources and what is unverified on a GPU: docs/design.md (*The GPU colour
kernel*).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import triton
import triton.language as tl
from nvidia.dali import fn

from .colour_spec import (
    GRAY_WEIGHTS,
    P_ADDITIVE,
    P_PER_CHANNEL,
    U_BRIGHTNESS,
    U_GRAY,
    U_JITTER,
    U_ORDER,
    UNIFORMS,
    colour_params,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 1024  # pixels per block on the GPU (4 warps: 8 pixels a thread)
INTERPRETER_BLOCK = (
    1024  # under the interpreter too: the 64x64 goldens take 4 blocks (the loop is tested)
)


@triton.jit
def _clip01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _load_pixels(image, offs, mask):
    """A block of HWC uint8 pixels as float32 channels in [0, 1]."""
    r = tl.load(image + offs * 3 + 0, mask=mask, other=0).to(tl.float32) / 255.0
    g = tl.load(image + offs * 3 + 1, mask=mask, other=0).to(tl.float32) / 255.0
    b = tl.load(image + offs * 3 + 2, mask=mask, other=0).to(tl.float32) / 255.0
    return r, g, b


@triton.jit
def _to_level(x):
    return tl.floor(tl.minimum(tl.maximum(x * 255.0, 0.0), 255.0) + 0.5).to(tl.uint8)


@triton.jit
def _apply_op(op, r, g, b, value, m0, m1, m2, additive):
    """Op ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue) on float32 pixel blocks, clipped to [0, 1]."""
    if op == 0:
        if additive:
            r, g, b = r + value, g + value, b + value
        else:
            r, g, b = r * value, g * value, b * value
    elif op == 1:
        r, g, b = (r - m0) * value + m0, (g - m1) * value + m1, (b - m2) * value + m2
    else:
        hi = tl.maximum(r, tl.maximum(g, b))
        lo = tl.minimum(r, tl.minimum(g, b))
        chroma = hi - lo
        coloured = chroma > 0.0  # grey pixels have S = 0 and no hue: unchanged by both ops
        safe = tl.where(coloured, chroma, 1.0)
        if op == 2:
            # S' = min(S f, 1), V kept: each channel v - (v - x) min(f, v / (v - min))
            scale = tl.minimum(value, hi / safe)
            r = tl.where(coloured, hi - (hi - r) * scale, r)
            g = tl.where(coloured, hi - (hi - g) * scale, g)
            b = tl.where(coloured, hi - (hi - b) * scale, b)
        else:
            hue = tl.where(
                hi == r,
                (g - b) / safe,
                tl.where(hi == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
            )
            hue = hue + value * 6.0
            hue = hue - 6.0 * tl.floor(
                hue / 6.0
            )  # to [0, 6] (6 is 0: the channel curves agree there)
            fr = _clip01(tl.abs(hue - 3.0) - 1.0)
            fg = _clip01(2.0 - tl.abs(hue - 2.0))
            fb = _clip01(2.0 - tl.abs(hue - 4.0))
            r = tl.where(coloured, lo + chroma * fr, r)
            g = tl.where(coloured, lo + chroma * fg, g)
            b = tl.where(coloured, lo + chroma * fb, b)
    return _clip01(r), _clip01(g), _clip01(b)


@triton.jit
def _colour_kernel(
    src,
    dst,
    uniforms,
    params,
    pixels,
    n_uniforms: tl.constexpr,
    u_jitter: tl.constexpr,
    u_gray: tl.constexpr,
    u_values: tl.constexpr,
    u_order: tl.constexpr,
    p_per_channel: tl.constexpr,
    p_additive: tl.constexpr,
    g0: tl.constexpr,
    g1: tl.constexpr,
    g2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per image: ``src``/``dst`` (N, pixels, 3) uint8, ``uniforms`` (N, n_uniforms) float32."""
    n = tl.program_id(0).to(tl.int64)  # int64: n * pixels * 3 passes 2^31 at 14,268 views of 224 px
    image, out, u = src + n * pixels * 3, dst + n * pixels * 3, uniforms + n * n_uniforms
    jitter = tl.load(u + u_jitter) < tl.load(params + 0)
    gray = tl.load(u + u_gray) < tl.load(params + 1)
    additive = tl.load(params + p_additive) != 0.0
    kb, kc = tl.load(u + u_order + 0), tl.load(u + u_order + 1)
    ks, kh = tl.load(u + u_order + 2), tl.load(u + u_order + 3)
    # each op's position in the order: how many keys come before its own (a tie goes to the op listed first,
    # as on the CPU), so that the four positions are 0..3 whatever the keys
    pos_b = (kc < kb).to(tl.int32) + (ks < kb).to(tl.int32) + (kh < kb).to(tl.int32)
    pos_c = (kb <= kc).to(tl.int32) + (ks < kc).to(tl.int32) + (kh < kc).to(tl.int32)
    pos_s = (kb <= ks).to(tl.int32) + (kc <= ks).to(tl.int32) + (kh < ks).to(tl.int32)
    vb = tl.load(params + 3) + tl.load(params + 4) * tl.load(u + u_values + 0)
    vc = tl.load(params + 5) + tl.load(params + 6) * tl.load(u + u_values + 1)
    vs = tl.load(params + 7) + tl.load(params + 8) * tl.load(u + u_values + 2)
    vh = tl.load(params + 9) + tl.load(params + 10) * tl.load(u + u_values + 3)
    m0 = tl.zeros(
        [], tl.float32
    )  # the contrast pivot: the channel means just before the contrast op
    m1 = tl.zeros([], tl.float32)
    m2 = tl.zeros([], tl.float32)
    if jitter:
        s0 = tl.zeros([BLOCK], tl.float32)
        s1 = tl.zeros([BLOCK], tl.float32)
        s2 = tl.zeros([BLOCK], tl.float32)
        for start in range(0, pixels, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < pixels
            r, g, b = _load_pixels(image, offs, mask)
            for k in tl.static_range(3):
                if k < pos_c:  # the ops before the contrast
                    op = tl.where(pos_b == k, 0, tl.where(pos_s == k, 2, 3))
                    value = tl.where(op == 0, vb, tl.where(op == 2, vs, vh))
                    r, g, b = _apply_op(op, r, g, b, value, m0, m1, m2, additive)
            s0 += tl.where(mask, r, 0.0)
            s1 += tl.where(mask, g, 0.0)
            s2 += tl.where(mask, b, 0.0)
        m0 = tl.sum(s0, axis=0) / pixels
        m1 = tl.sum(s1, axis=0) / pixels
        m2 = tl.sum(s2, axis=0) / pixels
        if tl.load(params + p_per_channel) == 0.0:
            m0 = (m0 + m1 + m2) / 3.0
            m1 = m0
            m2 = m0
    for start in range(0, pixels, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < pixels
        r, g, b = _load_pixels(image, offs, mask)
        if jitter:
            for k in tl.static_range(4):
                op = tl.where(pos_b == k, 0, tl.where(pos_c == k, 1, tl.where(pos_s == k, 2, 3)))
                value = tl.where(op == 0, vb, tl.where(op == 1, vc, tl.where(op == 2, vs, vh)))
                r, g, b = _apply_op(op, r, g, b, value, m0, m1, m2, additive)
        if gray:
            r = g0 * r + g1 * g + g2 * b
            g = r
            b = r
        tl.store(out + offs * 3 + 0, _to_level(r), mask=mask)  # rounded half up, once
        tl.store(out + offs * 3 + 1, _to_level(g), mask=mask)
        tl.store(out + offs * 3 + 2, _to_level(b), mask=mask)


def colour_batch(
    images: torch.Tensor, uniforms: torch.Tensor, params: torch.Tensor
) -> torch.Tensor:
    """The colour stage (without the flip) of ``images`` (N, H, W, 3) uint8 with per-view ``uniforms``
    (N, K >= len(UNIFORMS)) float32 (the draws are each row's last ``len(UNIFORMS)``: ``view_plan``) and
    ``colour_params`` -> (N, H, W, 3) uint8, on the images' device (CUDA, or
    CPU under ``TRITON_INTERPRET=1``)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"colour_batch: images must be (N, H, W, 3) uint8, got {tuple(images.shape)} {images.dtype}"
        )
    images, uniforms = images.contiguous(), uniforms.to(torch.float32).contiguous()
    out = torch.empty_like(images)
    if len(images) == 0:
        return out
    base = uniforms.shape[1] - len(
        UNIFORMS
    )  # where the draws start in a row (after the crop's seed)
    _colour_kernel[(len(images),)](
        images,
        out,
        uniforms,
        params.to(device=images.device, dtype=torch.float32),
        images.shape[1] * images.shape[2],
        n_uniforms=uniforms.shape[1],
        u_jitter=base + U_JITTER,
        u_gray=base + U_GRAY,
        u_values=base + U_BRIGHTNESS,
        u_order=base + U_ORDER,
        p_per_channel=P_PER_CHANNEL,
        p_additive=P_ADDITIVE,
        g0=GRAY_WEIGHTS[0],
        g1=GRAY_WEIGHTS[1],
        g2=GRAY_WEIGHTS[2],
        BLOCK=INTERPRETER_BLOCK if _INTERPRET else BLOCK,
    )
    return out


def _dali_batch(params: np.ndarray, images, uniforms):
    """``dl_tensor_python_function``'s body: lists of DLPack tensors in, one DLPack tensor per sample out.
    Views of one shape (every view of a training batch: ``cfg.size`` square) go in one launch."""
    from nvidia.dali.ops._operators.python_function import PythonFunction

    x = [torch.from_dlpack(t) for t in images]
    u = [torch.from_dlpack(t) for t in uniforms]
    stream = None
    if x and _on_gpu(
        x[0]
    ):  # run on DALI's stream: ordered after the crop and before the blur, no host sync
        stream = torch.cuda.ExternalStream(PythonFunction.current_stream().ptr, device=x[0].device)
    with torch.cuda.stream(stream) if stream is not None else _no_stream():
        table = _params_on(x[0].device if x else torch.device("cpu"), params.tobytes())
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(x):
            groups.setdefault(tuple(t.shape), []).append(i)
        out: list = [None] * len(x)
        for indices in groups.values():
            result = colour_batch(
                torch.stack([x[i] for i in indices]), torch.stack([u[i] for i in indices]), table
            )
            for j, i in enumerate(indices):
                out[i] = torch.utils.dlpack.to_dlpack(result[j])
    return out


def _on_gpu(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda


class _no_stream:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@functools.lru_cache(maxsize=16)
def _params_on(device: torch.device, params: bytes) -> torch.Tensor:
    """The parameters as a float32 tensor on ``device``, copied there once per device and configuration."""
    return torch.frombuffer(bytearray(params), dtype=torch.float32).to(device)


def kernel_colour_stage(images, uniforms, cfg):
    """Colour jitter (p) and grayscale (p) of a batch of uint8 HWC ``images`` (DALI GPU data; CPU data runs the
    kernel under the Triton interpreter) with the views' ``ViewPlan.uniform``; the flip is the caller's."""
    assert len(UNIFORMS) > U_ORDER + 3
    device = images.device
    if device == "gpu":
        uniforms = uniforms.gpu()
    out = fn.dl_tensor_python_function(
        images,
        uniforms,
        function=functools.partial(_dali_batch, colour_params(cfg)),
        batch_processing=True,
        synchronize_stream=False,
        num_outputs=1,
        device=device,
    )
    return fn.reshape(out, layout="HWC")

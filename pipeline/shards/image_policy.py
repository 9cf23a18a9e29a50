"""What the shard writer does to each image before it is stored (``prepare_file``, ``prepare_pixels``).

Baseline JPEGs within the limits are kept byte-identical (no generation loss, nvJPEG's hardware path takes
them); everything else PIL opens is decoded, turned upright, converted to RGB and re-encoded as a baseline JPEG
(or PNG for raw pixels, by ``pixel_format``), optionally shrunk at write time so every epoch decodes fewer
pixels. Runs in the writer's worker processes, so it imports nothing but PIL and numpy (a worker that imported
torch would cost ~700 MB and seconds). The rules case by case: docs/data.md.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from ...common.errors import SimclrError
from .shardset import jpeg_frame

# PIL's `subsampling` argument for each flag value ('auto' is resolved per image).
JPEG_SUBSAMPLING = {"444": 0, "422": 1, "420": 2}
SUBSAMPLING_CHOICES = ("auto", *JPEG_SUBSAMPLING)
EXIF_ORIENTATION = 0x0112
# JPEG start-of-frame markers and what each frame type is (only SOF0 is plain baseline).
SOF_MARKERS = {
    0xC0: "baseline",
    0xC1: "extended sequential",
    0xC2: "progressive",
    0xC3: "lossless",
    0xC5: "differential",
    0xC6: "differential progressive",
    0xC7: "differential lossless",
    0xC9: "arithmetic-coded",
    0xCA: "arithmetic-coded progressive",
    0xCB: "arithmetic-coded lossless",
    0xCD: "arithmetic-coded differential",
    0xCE: "arithmetic-coded differential progressive",
    0xCF: "arithmetic-coded differential lossless",
}


class ImageProblem(SimclrError, ValueError):
    """An input that cannot be stored; the message is the reason (the caller adds the file name)."""


@dataclass(frozen=True)
class ImagePolicy:
    """How images are stored: JPEG quality and chroma subsampling of re-encoded images, optional size limits,
    and the encoding of raw pixels ('jpeg' or lossless 'png')."""

    quality: int = 95
    subsampling: str = "auto"
    max_side: int | None = None
    shorter_side: int | None = None
    pixel_format: str = "jpeg"

    def __post_init__(self):
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in [1, 100], got {self.quality}")
        if self.subsampling not in SUBSAMPLING_CHOICES:
            raise ValueError(
                f"--subsampling must be one of {', '.join(SUBSAMPLING_CHOICES)}, got {self.subsampling!r}"
            )
        if self.max_side is not None and self.shorter_side is not None:
            raise ValueError("give --max_side or --shorter_side, not both")
        for name in ("max_side", "shorter_side"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if self.pixel_format not in ("jpeg", "png"):
            raise ValueError(f"--pixel_format must be 'jpeg' or 'png', got {self.pixel_format!r}")

    def target_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The reduced (width, height) for an image of this size, or None when it stays as it is."""
        if self.max_side and max(width, height) > self.max_side:
            scale = self.max_side / max(width, height)
        elif self.shorter_side and min(width, height) > self.shorter_side:
            scale = self.shorter_side / min(width, height)
        else:
            return None
        return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass
class Prepared:
    """An image as it will be stored: encoded bytes, the member extension, stored size, and what was done."""

    data: bytes
    ext: str  # 'jpg' or 'png'
    size: tuple[int, int]  # stored (width, height)
    changes: list[str] = field(
        default_factory=list
    )  # why it was re-encoded; empty: stored byte-identical


def jpeg_frame_type(data: bytes) -> str | None:
    """The frame type of a JPEG stream from its start-of-frame marker ('baseline', 'progressive', ...), None if
    no SOF marker comes before the scan data."""
    frame = jpeg_frame(data)
    return SOF_MARKERS.get(frame[0]) if isinstance(frame, tuple) else None


def to_rgb_or_gray(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 'RGB' or 'L' (8 bit): alpha dropped, palettes expanded, 16/32-bit integers scaled by
    255/65535 (PIL's 16-bit modes), floats taken as [0, 1]."""
    mode = image.mode
    if mode in ("RGB", "L"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I (how PIL holds 16-bit PNG/TIFF samples)
        values = np.asarray(image).astype(np.float64)
        return Image.fromarray(
            np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8), "L"
        )
    if mode == "F":
        return Image.fromarray(
            np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8), "L"
        )
    if mode in ("LA", "La"):
        return image.convert("L")
    if mode in ("P", "PA"):
        return image.convert("RGBA").convert(
            "RGB"
        )  # via RGBA: PIL warns on palette transparency otherwise
    return image.convert("RGB")  # RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV


def encode(
    image: Image.Image, policy: ImagePolicy, pixel_format: str = "jpeg", source_subsampling: int = 0
) -> bytes:
    """Baseline JPEG (or PNG); ``source_subsampling``: PIL's code of the source JPEG's chroma subsampling, which
    ``policy.subsampling`` 'auto' keeps (0, 4:4:4, for sources that are not JPEGs)."""
    buffer = io.BytesIO()
    if pixel_format == "png":
        image.save(buffer, format="PNG")
    else:
        subsampling = (
            source_subsampling
            if policy.subsampling == "auto"
            else JPEG_SUBSAMPLING[policy.subsampling]
        )
        image.save(
            buffer,
            format="JPEG",
            quality=policy.quality,
            subsampling=subsampling,
            progressive=False,
            optimize=False,
        )
    return buffer.getvalue()


def check_decodes(image: Image.Image) -> None:
    """Decode fully (a JPEG at 1/8 scale through DCT scaling, which still reads every byte); raises ImageProblem."""
    try:
        image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
    except Exception as error:  # PIL raises OSError/SyntaxError/ValueError... for bad data
        raise ImageProblem(describe_error(error)) from None


def describe_error(error: Exception) -> str:
    text = str(error)
    if "truncated" in text.lower():
        return f"truncated image data ({text})"
    return f"corrupt image ({type(error).__name__}: {text})"


def open_image(data: bytes) -> Image.Image:
    if not data:
        raise ImageProblem("empty file")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageProblem(
            "not a decodable image (unknown format, or truncated before the image header ends)"
        ) from None
    except Exception as error:
        raise ImageProblem(describe_error(error)) from None


def prepare_file(data: bytes, policy: ImagePolicy) -> Prepared:
    """The stored form of an image file's bytes (see the module docstring); raises ``ImageProblem``."""
    image = open_image(data)
    changes = []
    if image.format != "JPEG":
        changes.append(f"{image.format or 'unknown format'}")
    else:
        frame = jpeg_frame_type(data)
        if frame != "baseline":
            changes.append(f"{frame or 'unrecognised'} JPEG")
        if image.mode not in ("RGB", "L"):
            changes.append(f"{image.mode} JPEG")
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except (
        Exception
    ):  # a damaged EXIF block: the pixels may still be fine, and no rotation is known
        orientation = 1
    if orientation not in (1, None):
        changes.append("EXIF-rotated")
    # The displayed size: orientations 5-8 swap width and height.
    width, height = (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size
    target = policy.target_size(width, height)
    if target:
        changes.append("resized")
    if not changes:
        check_decodes(image)
        return Prepared(data, "jpg", (width, height))
    # PIL's code of a JPEG's subsampling (-1 for CMYK or unusual layouts: then full-resolution colour)
    source_subsampling = (
        max(0, JpegImagePlugin.get_sampling(image)) if image.format == "JPEG" else 0
    )
    try:
        if (
            target and image.format == "JPEG"
        ):  # decode at 1/2, 1/4 or 1/8 scale where still >= the target
            raw_target = target[::-1] if orientation in (5, 6, 7, 8) else target
            image.draft(image.mode if image.mode in ("RGB", "L") else None, raw_target)
        image.seek(0)  # the first frame of an animation
        image.load()
        image = to_rgb_or_gray(
            ImageOps.exif_transpose(image) if orientation not in (1, None) else image
        )
        if target:
            image = image.resize(target, Image.Resampling.LANCZOS)
    except ImageProblem:
        raise
    except Exception as error:
        raise ImageProblem(describe_error(error)) from None
    return Prepared(encode(image, policy, "jpeg", source_subsampling), "jpg", image.size, changes)


def prepare_pixels(pixels: np.ndarray, policy: ImagePolicy) -> Prepared:
    """Raw uint8 pixels (H, W), (H, W, 1) or (H, W, 3) -> JPEG or PNG per ``policy.pixel_format``."""
    image = Image.fromarray(
        pixels.squeeze(-1) if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
    )
    changes = ["pixels"]
    target = policy.target_size(*image.size)
    if target:
        image = image.resize(target, Image.Resampling.LANCZOS)
        changes.append("resized")
    ext = "png" if policy.pixel_format == "png" else "jpg"
    return Prepared(encode(image, policy, policy.pixel_format), ext, image.size, changes)


def prepare(payload: str | bytes | np.ndarray, policy: ImagePolicy) -> Prepared | str:
    """One input -> its stored form, or the reason it cannot be stored (a str). ``payload``: a file name to read,
    the file's bytes, or raw pixels."""
    try:
        if isinstance(payload, np.ndarray):
            return prepare_pixels(payload, policy)
        if isinstance(payload, str):
            try:
                with open(payload, "rb") as handle:
                    payload = handle.read()
            except OSError as error:
                return f"cannot be read ({error.strerror or error})"
        return prepare_file(payload, policy)
    except ImageProblem as problem:
        return str(problem)


def prepare_chunk(payloads: list, policy: ImagePolicy) -> list[Prepared | str]:
    """``prepare`` over a chunk of inputs: what a writer worker process runs per task."""
    return [prepare(payload, policy) for payload in payloads]

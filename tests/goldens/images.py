"""The real images the TensorFlow goldens are made from (``make goldens``), with numpy and Pillow only.

20 CIFAR-10 training JPEGs (the first two of every class folder, 32x32) and 10 ImageNet-sample photographs
(every 100th file, the shorter side resized to 80 px with Pillow's bicubic filter, then the central 64x64),
as uint8 HWC RGB arrays. The goldens store these input arrays beside TensorFlow's outputs, so a test feeds
our stages exactly the pixels TensorFlow saw (no JPEG decoder differences enter the comparison).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

GOLDENS = Path(__file__).resolve().parent
DATA = GOLDENS.parents[1].parent / "shared" / "data"  # ../shared/data from the project root
IMAGENET_SIDE = 64


def _cifar_paths() -> list[Path]:
    root = DATA / "cifar10" / "train"
    return [path for folder in sorted(root.iterdir()) for path in sorted(folder.glob("*.jpg"))[:2]]


def _imagenet_paths() -> list[Path]:
    return sorted((DATA / "imagenet-sample").glob("*.JPEG"))[::100]


def _central_crop(image: Image.Image, side: int) -> np.ndarray:
    scale = (side * 1.25) / min(image.size)
    image = image.resize(
        (max(side, round(image.width * scale)), max(side, round(image.height * scale))),
        Image.BICUBIC,
    )
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)), np.uint8)


def golden_images() -> dict[str, np.ndarray]:
    """``{"cifar": (20, 32, 32, 3), "imagenet": (10, 64, 64, 3)}`` uint8; raises FileNotFoundError without the data."""
    if not DATA.is_dir():
        raise FileNotFoundError(f"{DATA} is missing: the goldens are made from ../shared/data")
    cifar = np.stack([np.asarray(Image.open(p).convert("RGB"), np.uint8) for p in _cifar_paths()])
    imagenet = np.stack(
        [_central_crop(Image.open(p).convert("RGB"), IMAGENET_SIDE) for p in _imagenet_paths()]
    )
    return {"cifar": cifar, "imagenet": imagenet}

"""Shared fixtures: small shard sets written with the project's own shard writer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

from simclr_dali.pipeline.shards.pixel_sources import array_samples  # noqa: E402
from simclr_dali.pipeline.shards.writer import write_shards  # noqa: E402


def tiny(*without: str, **values) -> dict:
    """The tests' tiny training run (configs/smoke/tiny.yaml, shared with bench.py sigkill_resume) as a flat
    config dict: less the keys ``without`` (whose defaults then apply), with ``values`` over it."""
    base = yaml.safe_load((ROOT / "configs" / "smoke" / "tiny.yaml").read_text())
    return {**{key: value for key, value in base.items() if key not in without}, **values}


def random_images(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth random colour images (JPEG-friendly), uint8 (count, size, size, 3)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, 4, 4, 3)).astype(np.float32)
    return np.clip(
        np.kron(coarse, np.ones((1, size // 4, size // 4, 1)))
        + rng.normal(0, 8, (count, size, size, 3)),
        0,
        255,
    ).astype(np.uint8)


def build_wheel(out: Path) -> Path:
    """The distribution as ``pip install .`` builds it (no build isolation: setuptools from this venv), built from
    a copy of the checkout's files (tracked, and untracked but not ignored): setuptools reuses a ``build/lib`` it
    finds, so a build in the checkout itself would ship modules that an earlier tree had and this one lost."""
    import shutil
    import subprocess

    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    source = out / "source"
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
        ]
        + ["-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return next(out.glob("simclr_dali-*.whl"))


def make_shards(
    directory: Path,
    count: int,
    num_classes: int = 12,
    size: int = 32,
    per_shard: int = 40,
    seed: int = 0,
    prefix: str = "part",
) -> tuple[Path, np.ndarray]:
    """Write ``count`` random images with labels ``i % num_classes`` (so labels >= 10 occur); returns (dir, labels)."""
    labels = np.arange(count) % num_classes
    images = random_images(count, size, seed)
    write_shards(
        array_samples(images, labels),
        str(directory / f"{prefix}-%06d.tar"),
        [f"c{i}" for i in range(num_classes)],
        total=count,
        max_count=per_shard,
        progress=False,
    )
    return directory, labels


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """103 samples, 12 classes, 3 shards of <= 40: odd sizes on purpose."""
    return make_shards(tmp_path_factory.mktemp("small"), 103)


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state (device, mixed precision): each test starts without it, as a
    process running train.py or evaluate.py does."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


# --------------------------------------------------------------------------- a real S3 server (issue 28)


@pytest.fixture(scope="session")
def s3_server():
    """One SeaweedFS for the session; skipped (with the reason) only where its binary cannot run."""
    from simclr_dali.bench.s3_local import SeaweedServer

    try:
        server = SeaweedServer().start()
    except (RuntimeError, OSError) as error:
        pytest.skip(f"SeaweedFS cannot run here: {error}")
    yield server
    server.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The server's credentials and endpoint in the standard AWS variables, for this test only."""
    from simclr_dali.pipeline.shards import s3

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3.client.cache_clear()
    yield s3_server
    s3.client.cache_clear()

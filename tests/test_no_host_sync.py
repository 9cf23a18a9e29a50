"""No host sync in a multi-process training step (issue 29): 2 gloo processes run the product's step, plain and
micro-batched, with global BN converted as for a CUDA run, under a dispatch mode that fails on
``aten._local_scalar_dense``, ``aten.nonzero`` and boolean-mask indexing (tests/no_sync_steps.py).

Checked once on the code before this change: there the CUDA conversion gave torch's ``SyncBatchNorm``, which
fails on these CPU processes before it reaches its boolean-mask index (``SyncBatchNorm layers only work with GPU
modules``): on CUDA that index is the sync. The micro-batched run also uses BN's cumulative average
(``momentum=None``), whose update no longer reads ``float(num_batches_tracked)``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))


@pytest.mark.parametrize("kind", ["plain", "micro"])
def test_two_process_step_has_no_host_sync(tmp_path, kind):
    out = tmp_path / f"{kind}.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    result = subprocess.run(
        [*command, str(ROOT / "tests" / "no_sync_steps.py"), str(out), kind],
        cwd=ROOT,
        env=env,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert int(out.read_text()) > 1000  # the mode saw the steps' ops (it was active)


def test_the_mode_catches_each_kind_of_sync():
    """The guard itself: ``.item()``, ``float()``, ``nonzero`` and a boolean mask raise; plain ops pass."""
    from no_sync_steps import NoHostSync

    x = torch.arange(6.0)
    with NoHostSync() as guard:
        y = (x * 2).sum()  # fine
        for sync in (
            lambda: y.item(),
            lambda: float(y),
            lambda: x.nonzero(),
            lambda: x[x > 2],
            lambda: bool(y),
        ):
            with pytest.raises(AssertionError, match="host sync"):
                sync()
    assert guard.ops >= 2

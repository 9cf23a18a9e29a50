"""The fused Triton NT-Xent backend (model/ntxent_triton.py) against float64 dense computations.

Without a GPU the kernels run under the Triton interpreter on CPU tensors. TRITON_INTERPRET must be set
before triton is first imported, and other test modules may already have imported it in this pytest
process, so each group of checks runs in a fresh interpreter: this file re-run as a script
(``python tests/test_ntxent_triton.py GROUP``) with the variable set. The checks print the relative
errors they see (pytest -s shows them). ``launch_grid`` is pure and is tested in this process. The Hopper compile
checks of every launch (no GPU needed) are tests/test_triton_sm90.py.

On a GPU: ``python tests/test_ntxent_triton.py cuda`` (or the ``gpu``-marked test) runs the compiled
kernels on float32 (exact and TF32 products), bfloat16, float16 and float64 against float64, the
saturated regime included, and prints the launch plans and the TF32 error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def _run_group(group: str, interpret: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), group],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _check_group(group: str, interpret: bool = True):
    # A fresh process: TRITON_INTERPRET is read when triton.jit decorates, i.e. at first import.
    proc = _run_group(group, interpret)
    print(proc.stdout)
    assert proc.returncode == 0, (
        f"{group} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def test_loss_and_grads_float32_and_float64():
    _check_group("loss_fp32")


def test_loss_and_grads_bfloat16_and_float16():
    _check_group("loss_bf16")


def test_row_kernels_distributed_slice():
    _check_group("kernels")


def test_saturated_pairs_match_float64():
    """Near-duplicate views at tau = 0.05, N = 256, d = 128 (loss ~5e-6): see SATURATED_TOL."""
    _check_group("saturated")


def test_exact_for_every_norm():
    """Zero rows, rows of norm <= 1e-12, norms 1e-30..1e30 (float64: 1e-300..1e300), all-zero batches and
    identical views (tests/ntxent_properties.py): loss and every row's gradient within 1e-6 (float32) and 1e-12
    (float64) of the float64 reference; NaN and inf propagate as on the chunked path."""
    _check_group("properties")


@pytest.mark.gpu
def test_compiled_kernels_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (the compiled kernels)")
    _check_group("cuda", interpret=False)


# --------------------------------------------------------------------------- launch_grid (pure, in process)

H100_SMS = 132


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("rows", [1024, 8192])
@pytest.mark.parametrize("world", [1, 8])  # one GPU (columns = rows) or 8 (columns = 8 x rows)
@pytest.mark.parametrize("d", [128, 256])
def test_launch_grid_fills_an_h100(dtype_name, precision, rows, world, d):
    """>= 2 programs per SM of an H100 for both kernels, with the CUDA tiles (BLOCK_M >= 64 for 16-bit)."""
    import torch

    from simclr_dali.model.ntxent_triton import CUDA_TILES, launch_grid

    dtype = getattr(torch, dtype_name)
    plan = launch_grid(rows, world * rows, d, dtype, H100_SMS, float32_matmul_precision=precision)
    assert (
        launch_grid(
            rows,
            world * rows,
            d,
            dtype,
            H100_SMS,
            float32_matmul_precision=precision,
            tiles=CUDA_TILES,
        )
        == plan
    )  # the CUDA table is the default, whatever the machine
    for name, launch in (("negatives", plan.negatives), ("grad", plan.grad)):
        assert launch.programs >= 2 * H100_SMS, (name, launch)
        if dtype in (torch.bfloat16, torch.float16):
            assert launch.block_m >= 64, (name, launch)
        # the splits cover the columns exactly once, in whole tiles
        assert launch.split_columns % launch.block_n == 0
        covered = launch.column_splits * launch.split_columns
        assert covered - launch.split_columns < world * rows <= covered
        assert launch.grid[-1] == launch.column_splits


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("rows", [512, 1024, 8192, 131072])
@pytest.mark.parametrize("world", [1, 8])
@pytest.mark.parametrize("d", [128, 256])
def test_launch_grid_splits_are_balanced(dtype_name, precision, rows, world, d):
    """No column split wider than an even division of the column tiles into that many splits (the earlier
    (C - 1) // (S - 1) split 128 tiles as 31/31/31/31/4, and as 127/1 for the d = 256 gradient)."""
    import torch
    import triton

    from simclr_dali.model.ntxent_triton import launch_grid

    plan = launch_grid(
        rows,
        world * rows,
        d,
        getattr(torch, dtype_name),
        H100_SMS,
        float32_matmul_precision=precision,
    )
    for name, launch in (("negatives", plan.negatives), ("grad", plan.grad)):
        column_tiles = triton.cdiv(world * rows, launch.block_n)
        widths = [
            min(launch.split_columns, world * rows - start)
            for start in range(0, world * rows, launch.split_columns)
        ]
        assert len(widths) == launch.column_splits, (name, launch)
        assert launch.split_columns // launch.block_n == triton.cdiv(
            column_tiles, launch.column_splits
        ), (name, launch)
        assert launch.programs >= 2 * H100_SMS or launch.column_splits == column_tiles, (
            name,
            launch,
        )


def test_launch_grid_balanced_at_8192():
    """2N = 8,192 in bf16, d = 128, an H100: the negatives' 128 column tiles in 8 even splits of 16 tiles, 512
    programs in 2 whole waves of 264 (5 splits of 26 tiles gave 320 programs: 1.21 waves, a second wave as long
    as the first for 56 programs)."""
    import torch

    from simclr_dali.model.ntxent_triton import launch_grid

    negatives = launch_grid(8192, 8192, 128, torch.bfloat16, H100_SMS).negatives
    assert negatives.column_splits == 8 and negatives.split_columns == 16 * negatives.block_n
    assert negatives.programs == 512  # 1.94 x 264


def _wave_time(launch, columns: int, slots: int) -> float:
    """A launch's length in column tiles' work: whole waves of ``slots`` programs, each as long as its widest."""
    import triton

    from simclr_dali.model.ntxent_triton import PROGRAM_OVERHEAD_TILES

    widest = min(launch.split_columns, columns) // launch.block_n + (
        min(launch.split_columns, columns) % launch.block_n > 0
    )
    return triton.cdiv(launch.programs, slots) * (widest + PROGRAM_OVERHEAD_TILES)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("sms", [108, 132, 114])  # A100, H100 SXM, H100 PCIe
def test_launch_grid_ends_in_whole_waves(dtype_name, sms):
    """Over many sizes: each launch ends no later (in whole waves of 2 programs per SM) than the fewest even
    splits reaching 2 programs per SM (the previous rule) would, and still has >= 2 programs per SM."""
    import torch
    import triton

    from simclr_dali.model.ntxent_triton import CUDA_TILES, _balanced_split, launch_grid

    slots = 2 * sms
    for rows in (256, 512, 1024, 2048, 4096, 8192, 16384):
        for world in (1, 2, 8):
            columns = world * rows
            plan = launch_grid(rows, columns, 128, getattr(torch, dtype_name), sms)
            for launch in (plan.negatives, plan.grad):
                blocks = launch.programs // launch.column_splits
                column_tiles = triton.cdiv(columns, launch.block_n)
                least = max(1, min(triton.cdiv(slots, blocks), column_tiles))
                fewest = _balanced_split(column_tiles, least)
                baseline = _with_split(launch, fewest, column_tiles, blocks)
                assert _wave_time(launch, columns, slots) <= _wave_time(baseline, columns, slots), (
                    rows,
                    world,
                    launch,
                )
                assert launch.programs >= slots or launch.column_splits == column_tiles
    assert CUDA_TILES  # (the default table: what launch_grid used)


def _with_split(launch, tiles_per_split: int, column_tiles: int, blocks: int):
    """``launch`` with ``tiles_per_split`` tiles per column split instead (the grid's split count follows)."""
    import dataclasses

    import triton

    splits = triton.cdiv(column_tiles, tiles_per_split)
    grid = (*launch.grid[:-1], splits)
    assert blocks * splits == dataclasses.replace(launch, grid=grid).programs
    return dataclasses.replace(
        launch, grid=grid, column_splits=splits, split_columns=tiles_per_split * launch.block_n
    )


def test_launch_grid_splits_only_when_needed():
    """Many row blocks: no column split (no partial buffer); few: as many splits as the target needs."""
    import torch

    from simclr_dali.model.ntxent_triton import launch_grid

    big = launch_grid(131072, 131072, 128, torch.bfloat16, H100_SMS)
    assert big.negatives.column_splits == big.grad.column_splits == 1
    small = launch_grid(1024, 8192, 128, torch.bfloat16, H100_SMS)
    assert small.negatives.column_splits > 1 and small.grad.column_splits > 1
    assert small.negatives.programs < 4 * 2 * H100_SMS  # not split further than needed
    forced = launch_grid(100, 100, 8, torch.float32, H100_SMS, column_splits=3)
    assert (
        forced.negatives.column_splits == forced.grad.column_splits == 2
    )  # 2 column tiles of 64: at most 2 splits


# --------------------------------------------------------------------------- the checks (child process)

TOL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
# Saturated regime (near-duplicate views, tau = 0.05: loss ~5e-6, 1 - p_pos ~1e-5), relative to float64 on
# the same (dtype-representable) inputs:
# - float32: 1e-5, the target (measured ~1e-6; eager float32 autograd of the reference gets ~1e-3, the
#   previous kernels' p_pos - 1 got ~4e-2 here).
# - bfloat16: 1e-2. The gradient is returned in bfloat16 (unit roundoff 2^-9 = 2e-3: the rounding alone costs
#   ~1.7e-3, as the float32 chunked path measures), and both products take bfloat16 operands: each logit s/tau
#   moves by ~2^-9 |s| / tau; measured ~5e-3 under the interpreter (which truncates to bfloat16 where the GPU
#   rounds). Loss: 2e-3 (measured ~3e-4).
# - float16 (with a loss scale of 2^16, as GradScaler does: the unscaled gradient, ~1e-9, underflows float16):
#   2e-3, four times float16's 2^-11 rounding (measured ~7e-4).
SATURATED_TOL = {
    "float32": (1e-5, 1e-5),
    "bfloat16": (2e-3, 1e-2),
    "float16": (2e-3, 2e-3),
}  # (loss, grads)
LOSS_SCALE = {"float16": 2.0**16}


def _rel(a, b) -> float:
    """||a - b|| / ||b||; absolute where b is (numerically) zero, e.g. N = 1 where the loss is log 1 = 0."""
    a, b = a.double(), b.double()
    scale = b.norm().item()
    err = (a - b).norm().item()
    return err / scale if scale > 1e-9 else err


def _loss_case(
    torch, n: int, d: int, tau: float, dtype, device: str, seed: int, precision: str = "ieee"
):
    from simclr_dali.model.ntxent import nt_xent, nt_xent_reference

    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=gen).to(dtype)
    # Mildly correlated positives: the loss stays O(1). (The saturated regime has its own group.)
    z2 = (0.2 * z1.float() + torch.randn(n, d, generator=gen)).to(dtype)
    a1, a2 = z1.to(device, copy=True).requires_grad_(), z2.to(device, copy=True).requires_grad_()
    loss = nt_xent(a1, a2, tau, backend="triton", float32_matmul_precision=precision)
    loss_scale = LOSS_SCALE.get(str(dtype).removeprefix("torch."), 1.0)
    (loss * loss_scale).backward()
    r1, r2 = z1.double().requires_grad_(), z2.double().requires_grad_()
    ref = nt_xent_reference(r1, r2, tau)
    ref.backward()
    assert (
        torch.isfinite(loss).item()
        and torch.isfinite(a1.grad).all().item()
        and torch.isfinite(a2.grad).all().item()
    )
    assert a1.grad.dtype == dtype
    grads = [g.cpu().double() / loss_scale for g in (a1.grad, a2.grad)]
    return (
        ref.item(),
        _rel(loss.detach().cpu(), ref.detach()),
        _rel(grads[0], r1.grad),
        _rel(grads[1], r2.grad),
    )


def _loss_group(
    dtype_name: str, cases, device: str = "cpu", precision: str = "ieee", tol: float | None = None
) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    tol = tol or TOL[dtype_name]
    worst = 0.0
    for i, (n, d, tau) in enumerate(cases):
        value, *errs = _loss_case(torch, n, d, tau, dtype, device, seed=i, precision=precision)
        worst = max(worst, *errs)
        print(
            f"{dtype_name} ({precision}) N={n:4d} d={d:4d} tau={tau:<4} loss {value:7.4f}  "
            f"rel err loss {errs[0]:.2e} dz1 {errs[1]:.2e} dz2 {errs[2]:.2e}"
        )
        assert max(errs) < tol, (n, d, tau, errs)
    print(f"{dtype_name} ({precision}): max relative error {worst:.2e} (tolerance {tol:.0e})")
    return worst


def near_duplicate_views(torch, n: int, d: int, dtype, seed: int, noise: float = 1e-2):
    """Two views = one random base + independent noise of relative size ~noise: strong positives. Float64
    tensors holding ``dtype``-representable values (the reference sees exactly what the kernels see)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=gen, dtype=torch.float64)
    views = (base + noise * torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    return tuple(view.to(dtype).double() for view in views)


def _saturated_group(
    device: str = "cpu", sizes=((256, 128),), dtypes=("float32", "bfloat16", "float16")
) -> None:
    import torch

    from simclr_dali.model.ntxent import nt_xent, nt_xent_reference

    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        tol_loss, tol_grad = SATURATED_TOL[dtype_name]
        loss_scale = LOSS_SCALE.get(dtype_name, 1.0)
        for n, d in sizes:
            for i, tau in enumerate((0.05, 0.1)):
                z1, z2 = near_duplicate_views(torch, n, d, dtype, seed=i)
                r1, r2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
                ref = nt_xent_reference(r1, r2, tau)
                ref.backward()
                a1, a2 = (z.to(device=device, dtype=dtype).requires_grad_() for z in (z1, z2))
                loss = nt_xent(a1, a2, tau, backend="triton")
                (loss * loss_scale).backward()
                errs = [_rel(loss.detach().cpu(), ref.detach())]
                errs += [
                    _rel(g.cpu().double() / loss_scale, r.grad)
                    for g, r in ((a1.grad, r1), (a2.grad, r2))
                ]
                print(
                    f"saturated {dtype_name:8s} N={n:5d} d={d} tau={tau:<4} loss {ref.item():.3e}  rel err loss "
                    f"{errs[0]:.2e} dz1 {errs[1]:.2e} dz2 {errs[2]:.2e} (tolerance {tol_loss:.0e} / {tol_grad:.0e})"
                )
                assert errs[0] < tol_loss and max(errs[1:]) < tol_grad, (
                    dtype_name,
                    n,
                    d,
                    tau,
                    errs,
                )


def _dense(torch, rows, columns, row_offset: int, inv_temp: float, positives):
    """float64 row_negatives and row_grad of the definitions, from the full rows x columns matrix, with
    the loss's scales (1 / sum over all but the own column of E) as the gradient's row/column scales."""
    r, c = rows.double(), columns.double()
    m, big_m = r.shape[0], c.shape[0]
    exp_all = torch.exp((c @ c.T - 1.0) * inv_temp)
    exp_all.fill_diagonal_(0.0)
    scale_columns = 1.0 / exp_all.sum(1)
    exp_scores = torch.exp((r @ c.T - 1.0) * inv_temp)
    exp_scores[torch.arange(m), torch.arange(m) + row_offset] = 0.0
    scale_rows = 1.0 / exp_scores.sum(1)
    exp_scores[torch.arange(m), positives] = 0.0
    grad = (exp_scores * (scale_rows[:, None] + scale_columns[None, :])) @ c
    assert big_m == c.shape[0]
    return exp_scores.sum(1), scale_rows, scale_columns, grad


def _kernels_group() -> None:
    import torch

    from simclr_dali.model import ntxent_triton

    worst = {"float32": 0.0, "bfloat16": 0.0, "float16": 0.0}
    # (m, M, row_offset, d, tau): rows are columns[row_offset:row_offset + m], M > m (another rank's rows).
    cases = [
        (20, 70, 30, 24, 0.1),
        (10, 37, 27, 96, 0.05),
        (34, 68, 0, 40, 0.5),
        (6, 18, 6, 2048, 0.1),
    ]
    for i, (m, big_m, off, d, tau) in enumerate(cases):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            gen = torch.Generator().manual_seed(100 + i)
            columns = torch.randn(big_m, d, generator=gen, dtype=torch.float64)
            columns = torch.nn.functional.normalize(columns, dim=1).to(dtype)
            rows = columns[off : off + m]
            inv_temp = 1.0 / tau
            for kind, splits in (("pairs", None), ("other", None), ("pairs", 1), ("pairs", 3)):
                local = torch.arange(m)
                # the loss's positives, then another assignment (the argument is honoured, not assumed)
                positives = off + ((local + m // 2) % m if kind == "pairs" else (local + 1) % m)
                negatives, scale_rows, scale_columns, grad = _dense(
                    torch, rows, columns, off, inv_temp, positives
                )
                # partial sums (splits, ...), added here in split order as the epilogue kernels do
                got_neg = ntxent_triton.row_negatives(
                    rows, columns, positives, off, inv_temp, column_splits=splits
                ).sum(0)
                got_grad = ntxent_triton.row_grad(
                    rows,
                    columns,
                    scale_rows.float(),
                    scale_columns.float(),
                    positives,
                    off,
                    inv_temp,
                    column_splits=splits,
                ).sum(0)
                assert (
                    got_neg.dtype == torch.float32
                    and got_grad.dtype == torch.float32
                    and got_grad.shape == (m, d)
                )
                assert torch.isfinite(got_neg).all() and torch.isfinite(got_grad).all()
                e_neg, e_grad = _rel(got_neg, negatives), _rel(got_grad, grad)
                name = str(dtype).removeprefix("torch.")
                worst[name] = max(worst[name], e_neg, e_grad)
                plan = ntxent_triton._plan(rows, columns, "ieee", splits)
                print(
                    f"{name:8s} m={m:3d} M={big_m:3d} offset={off:3d} d={d:4d} tau={tau:<4} positives={kind} splits="
                    f"{plan.negatives.column_splits}/{plan.grad.column_splits}: rel err row_negatives {e_neg:.2e} "
                    f"row_grad {e_grad:.2e}"
                )
                assert max(e_neg, e_grad) < TOL[name], (m, big_m, off, d, tau, kind, e_neg, e_grad)
    print("max relative errors:", {k: f"{v:.2e}" for k, v in worst.items()})


def _cuda_checks() -> None:
    """Everything the interpreter checks, compiled; plus TF32's error (printed: the README quotes it), the
    launch plans on this GPU, and the dtype that reaches the loss under bf16 autocast."""
    import torch

    from simclr_dali.model import ntxent_triton
    from simclr_dali.model.ntxent import nt_xent
    from simclr_dali.model.simclr import ProjectionHead

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    _loss_group("float32", CUDA_CASES, device="cuda")
    _loss_group("bfloat16", CUDA_CASES, device="cuda")
    _loss_group("float16", CUDA_CASES, device="cuda")
    _loss_group("float64", CUDA_CASES[:3], device="cuda")
    tf32 = _loss_group("float32", CUDA_CASES, device="cuda", precision="tf32", tol=5e-2)
    print(
        f"TF32 products (float32_matmul_precision='tf32'): max relative error {tf32:.2e} vs float64"
    )
    _saturated_group(device="cuda", sizes=((256, 128), (4096, 128)))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for rows, columns in ((1024, 1024), (1024, 8192), (8192, 8192)):
        for dtype in (torch.float32, torch.bfloat16):
            plan = ntxent_triton.launch_grid(rows, columns, 128, dtype, sms)
            print(
                f"plan {rows}x{columns} {dtype}: negatives {plan.negatives.programs} programs, "
                f"grad {plan.grad.programs}"
            )
            assert min(plan.negatives.programs, plan.grad.programs) >= 2 * sms
    # Deterministic: the column splits' partial sums are merged in a fixed order (no atomics).
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator(device="cuda").manual_seed(7)
        z1, z2 = (
            torch.randn(1024, 128, device="cuda", generator=gen, dtype=dtype).requires_grad_()
            for _ in range(2)
        )
        runs = []
        for _ in range(2):
            z1.grad = z2.grad = None
            loss = nt_xent(z1, z2, 0.1)
            loss.backward()
            runs.append((loss.detach().clone(), z1.grad.clone(), z2.grad.clone()))
        assert all(torch.equal(a, b) for a, b in zip(*runs)), "two identical steps differ"
        plan = ntxent_triton.launch_grid(2048, 2048, 128, dtype, sms)
        print(
            f"{dtype}: two steps bit-identical ({plan.negatives.column_splits} / "
            f"{plan.grad.column_splits} column splits)"
        )
    head = ProjectionHead(64, 64, 32).cuda()
    x = torch.randn(16, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z1, z2 = head(x).chunk(2)
        loss = nt_xent(z1, z2, 0.1)
    loss.backward()
    print(f"under bf16 autocast the projection head (ends in BatchNorm1d) returns {z1.dtype}")
    assert z1.dtype == torch.bfloat16 and torch.isfinite(loss)


def _epilogue_group() -> None:
    """The per-row kernels (normalize, positive_stats, input_grad) against the PyTorch backend's versions,
    with several column splits' partial sums, odd sizes, a zero row (its norm clamped) and near-duplicates."""
    import torch

    from simclr_dali.model import ntxent_chunked as _chunked
    from simclr_dali.model import ntxent_triton

    for n, d, dtype in [
        (1, 8, torch.float32),
        (7, 33, torch.float32),
        (5, 2048, torch.float32),
        (9, 20, torch.float64),
        (6, 40, torch.bfloat16),
        (6, 40, torch.float16),
    ]:
        gen = torch.Generator().manual_seed(n * d)
        z1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
        z2 = z1 + 1e-3 * torch.randn(
            n, d, generator=gen, dtype=torch.float64
        )  # near-duplicates: r ~ tiny
        if dtype in (torch.float32, torch.float64):
            z1[0] = 0.0  # a clamped norm (its gradient, g / 1e-12, would overflow 16 bits)
        z1, z2 = z1.to(dtype), z2.to(dtype)
        rows, operands, norms = ntxent_triton.normalize(
            z1, z2.t().contiguous().t(), dtype
        )  # a strided z2
        want_rows, _, want_norms = _chunked.normalize(z1, z2, dtype)
        assert operands.dtype == dtype and rows.dtype == torch.promote_types(dtype, torch.float32)
        assert torch.equal(operands, rows.to(dtype))  # rounded to nearest, as PyTorch does
        errors = {"rows": _rel(rows, want_rows), "norms": _rel(norms, want_norms)}
        acc = rows.dtype
        partials = torch.rand(3, 2 * n, generator=gen, dtype=torch.float64).to(acc) * 1e-3
        stats = ntxent_triton.positive_stats(partials, rows, norms, 1.0 / 0.05)
        want_stats = _chunked.positive_stats(partials, rows, want_norms, 1.0 / 0.05)
        for name, got, want in zip(("loss_rows", "not_positive", "scale"), stats, want_stats):
            errors[name] = _rel(got, want)
        grad_partials = torch.randn(3, 2 * n, d, generator=gen, dtype=torch.float64).to(acc)
        grad_scale = torch.tensor(0.37, dtype=acc)
        got = ntxent_triton.input_grad(grad_partials, rows, stats[1], norms, grad_scale, dtype)
        want = _chunked.input_grad(
            grad_partials, rows, want_stats[1], want_norms, grad_scale, dtype
        )
        assert got.dtype == dtype
        # row by row: the clamped row's gradient (g / eps) would hide every other row's error
        row_errors = (got.double() - want.double()).norm(dim=1) / want.double().norm(dim=1)
        errors["input_grad"] = row_errors.max().item()
        # float32: a few ulps through log1p and the projection; float64: 1e-12; 16-bit outputs may round one
        # float32 ulp apart to the other side (a 16-bit ulp, 2^-8 or 2^-11, on an element)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3}.get(dtype, 5e-3)
        print(
            f"epilogue {str(dtype):14s} N={n:2d} d={d:4d}: "
            + " ".join(f"{k} {v:.1e}" for k, v in errors.items())
        )
        assert max(errors.values()) < tol, errors


def _properties_group() -> None:
    import torch
    from ntxent_properties import check_against_reference, check_non_finite_propagates

    from simclr_dali.model.ntxent import nt_xent, nt_xent_reference

    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        worst = check_against_reference(
            nt_xent, nt_xent_reference, dtype, seeds=(0, 1), tol=tol, backend="triton"
        )
        print(f"triton {dtype}: worst relative error {worst:.1e} (tolerance {tol:.0e})")
    check_non_finite_propagates(nt_xent, backend="triton")


# N = 1 (the loss is log 1), odd N and d that divide no tile, d = 2048 walked in chunks and split.
FP32_CASES = [
    (1, 8, 0.1),
    (2, 16, 0.05),
    (5, 20, 0.5),
    (7, 33, 0.05),
    (16, 64, 0.1),
    (35, 96, 0.05),
    (35, 96, 0.5),
    (33, 40, 0.1),
    (2, 2048, 0.1),
    (3, 2048, 0.05),
]
FP64_CASES = [(1, 8, 0.1), (7, 33, 0.05), (20, 40, 0.3)]  # statistics in float64 too
FP16_CASES = [(7, 33, 0.05), (21, 40, 0.1)]  # float16 weights scaled by 2^14 for the second product
BF16_CASES = [
    (1, 8, 0.1),
    (5, 20, 0.05),
    (7, 33, 0.5),
    (35, 96, 0.05),
    (33, 40, 0.1),
    (2, 2048, 0.05),
]
CUDA_CASES = [
    (1, 8, 0.1),
    (7, 33, 0.05),
    (1000, 128, 0.1),
    (4097, 128, 0.05),
    (517, 96, 0.5),
    (300, 2048, 0.1),
    (512, 256, 0.1),
]


def main(group: str) -> None:
    if group == "loss_fp32":
        _loss_group("float32", FP32_CASES)
        _loss_group("float64", FP64_CASES)
    elif group == "loss_bf16":
        _loss_group("bfloat16", BF16_CASES)
        _loss_group("float16", FP16_CASES)
    elif group == "kernels":
        _kernels_group()
        _epilogue_group()
    elif group == "saturated":
        from simclr_dali.model import ntxent_triton

        # The interpreter's time goes per operation: 32-row tiles with d in one K tile keep this group to
        # seconds; 16 "SMs" make the 16 row blocks split their columns in two.
        ntxent_triton.INTERPRETER_BLOCK, ntxent_triton.INTERPRETER_BLOCK_K = 32, 128
        ntxent_triton.INTERPRETER_SM_COUNT = 16
        _saturated_group()
    elif group == "properties":
        _properties_group()
    elif group == "cuda":
        _cuda_checks()
    else:
        raise SystemExit(f"unknown group {group!r}")


if __name__ == "__main__":
    if sys.argv[1] != "cuda":
        os.environ.setdefault(
            "TRITON_INTERPRET", "1"
        )  # before triton is imported (via model.ntxent_triton)
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1])

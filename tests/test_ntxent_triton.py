"""The fused Triton NT-Xent backend (model/ntxent_triton.py) against float64 dense computations.

Without a GPU the kernels run under the Triton interpreter on CPU tensors. TRITON_INTERPRET must be set
before triton is first imported, and other test modules may already have imported it in this pytest
process, so each group of checks runs in a fresh interpreter: this file re-run as a script
(``python tests/test_ntxent_triton.py GROUP``) with the variable set. The checks print the relative
errors they see (pytest -s shows them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def _run_group(group: str, interpret: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), group], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _check_group(group: str, interpret: bool = True):
    # A fresh process: TRITON_INTERPRET is read when triton.jit decorates, i.e. at first import.
    proc = _run_group(group, interpret)
    print(proc.stdout)
    assert proc.returncode == 0, f"{group} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_loss_and_grads_float32_and_float64():
    _check_group("loss_fp32")


def test_loss_and_grads_bfloat16_and_float16():
    _check_group("loss_bf16")


def test_row_kernels_distributed_slice():
    _check_group("kernels")


@pytest.mark.gpu
def test_compiled_kernels_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (the compiled kernels)")
    _check_group("cuda", interpret=False)


# --------------------------------------------------------------------------- the checks (child process)

TOL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}


def _rel(a, b) -> float:
    """||a - b|| / ||b||; absolute where b is (numerically) zero, e.g. N = 1 where the loss is log 1 = 0."""
    a, b = a.double(), b.double()
    scale = b.norm().item()
    err = (a - b).norm().item()
    return err / scale if scale > 1e-9 else err


def _loss_case(torch, n: int, d: int, tau: float, dtype, device: str, seed: int) -> tuple[float, float, float]:
    from model.ntxent import nt_xent, nt_xent_reference

    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=gen).to(dtype)
    # Mildly correlated positives: the loss stays O(1). (With strong positives and few rows the loss
    # tends to 0 as a difference of logits ~1/tau, and its relative error measures fp32 cancellation,
    # not the kernels: e.g. N=2, tau=0.05, loss 1.3e-3 carries ~3e-7 absolute error on either backend.)
    z2 = (0.2 * z1.float() + torch.randn(n, d, generator=gen)).to(dtype)
    a1, a2 = z1.to(device, copy=True).requires_grad_(), z2.to(device, copy=True).requires_grad_()
    loss = nt_xent(a1, a2, tau, backend="triton")
    loss.backward()
    r1, r2 = z1.double().requires_grad_(), z2.double().requires_grad_()
    ref = nt_xent_reference(r1, r2, tau)
    ref.backward()
    assert torch.isfinite(loss).item() and torch.isfinite(a1.grad).all().item() and torch.isfinite(a2.grad).all().item()
    assert a1.grad.dtype == dtype
    return ref.item(), _rel(loss.detach().cpu(), ref.detach()), _rel(a1.grad.cpu(), r1.grad), _rel(a2.grad.cpu(), r2.grad)


def _loss_group(dtype_name: str, cases, device: str = "cpu") -> None:
    import torch

    dtype = getattr(torch, dtype_name)
    worst = 0.0
    for i, (n, d, tau) in enumerate(cases):
        value, *errs = _loss_case(torch, n, d, tau, dtype, device, seed=i)
        worst = max(worst, *errs)
        print(f"{dtype_name} N={n:4d} d={d:4d} tau={tau:<4} loss {value:7.4f}  rel err loss {errs[0]:.2e} "
              f"dz1 {errs[1]:.2e} dz2 {errs[2]:.2e}")
        assert max(errs) < TOL[dtype_name], (n, d, tau, errs)
    print(f"{dtype_name}: max relative error {worst:.2e} (tolerance {TOL[dtype_name]:.0e})")


def _dense(torch, rows, columns, row_offset: int, inv_temp: float, positives):
    """float64 row_lse and row_grad of the definitions, from the full rows x columns matrix."""
    r, c = rows.double(), columns.double()
    m, big_m = r.shape[0], c.shape[0]
    logits_all = c @ c.T * inv_temp
    logits_all.fill_diagonal_(float("-inf"))
    lse_columns = torch.logsumexp(logits_all, dim=1)
    logits = r @ c.T * inv_temp
    own = torch.arange(m) + row_offset
    logits[torch.arange(m), own] = float("-inf")
    lse_rows = torch.logsumexp(logits, dim=1)
    weights = torch.exp(logits - lse_rows[:, None]) + torch.exp(logits - lse_columns[None, :])
    weights[torch.arange(m), positives] = 0.0
    assert big_m == c.shape[0]
    return lse_rows, lse_columns, weights @ c


def _kernels_group() -> None:
    import torch

    from model import ntxent_triton

    worst = {"float32": 0.0, "bfloat16": 0.0}
    # (m, M, row_offset, d, tau): rows are columns[row_offset:row_offset + m], M > m (another rank's rows).
    cases = [(20, 70, 30, 24, 0.1), (10, 37, 27, 96, 0.05), (34, 68, 0, 40, 0.5), (6, 18, 6, 2048, 0.1)]
    for i, (m, big_m, off, d, tau) in enumerate(cases):
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(100 + i)
            columns = torch.nn.functional.normalize(torch.randn(big_m, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)
            rows = columns[off:off + m]
            inv_temp = 1.0 / tau
            for kind in ("pairs", "other"):
                local = torch.arange(m)
                # the loss's positives, then another assignment (the argument is honoured, not assumed)
                positives = off + ((local + m // 2) % m if kind == "pairs" else (local + 1) % m)
                lse_rows, lse_columns, grad = _dense(torch, rows, columns, off, inv_temp, positives)
                got_lse = ntxent_triton.row_lse(rows, columns, off, inv_temp)
                got_grad = ntxent_triton.row_grad(rows, columns, lse_rows.float(), lse_columns.float(), positives, off, inv_temp)
                assert got_lse.dtype == torch.float32 and got_grad.dtype == torch.float32 and got_grad.shape == (m, d)
                assert torch.isfinite(got_lse).all() and torch.isfinite(got_grad).all()
                e_lse, e_grad = _rel(got_lse, lse_rows), _rel(got_grad, grad)
                name = str(dtype).removeprefix("torch.")
                worst[name] = max(worst[name], e_lse, e_grad)
                print(f"{name:8s} m={m:3d} M={big_m:3d} offset={off:3d} d={d:4d} tau={tau:<4} positives={kind}: "
                      f"rel err row_lse {e_lse:.2e} row_grad {e_grad:.2e}")
                assert max(e_lse, e_grad) < TOL[name], (m, big_m, off, d, tau, kind, e_lse, e_grad)
    print("max relative errors:", {k: f"{v:.2e}" for k, v in worst.items()})


# N = 1 (the loss is log 1), odd N and d that divide no tile, d = 2048 walked in chunks and split.
FP32_CASES = [(1, 8, 0.1), (2, 16, 0.05), (5, 20, 0.5), (7, 33, 0.05), (16, 64, 0.1), (35, 96, 0.05),
              (35, 96, 0.5), (33, 40, 0.1), (2, 2048, 0.1), (3, 2048, 0.05)]
FP64_CASES = [(1, 8, 0.1), (7, 33, 0.05), (20, 40, 0.3)]  # statistics in float64 too
FP16_CASES = [(7, 33, 0.05), (21, 40, 0.1)]  # float32 weights, TF32 product on the GPU
BF16_CASES = [(1, 8, 0.1), (5, 20, 0.05), (7, 33, 0.5), (35, 96, 0.05), (33, 40, 0.1), (2, 2048, 0.05)]
CUDA_CASES = [(1, 8, 0.1), (7, 33, 0.05), (1000, 128, 0.1), (4097, 128, 0.05), (517, 96, 0.5), (300, 2048, 0.1)]


def main(group: str) -> None:
    if group == "loss_fp32":
        _loss_group("float32", FP32_CASES)
        _loss_group("float64", FP64_CASES)
    elif group == "loss_bf16":
        _loss_group("bfloat16", BF16_CASES)
        _loss_group("float16", FP16_CASES)
    elif group == "kernels":
        _kernels_group()
    elif group == "cuda":
        _loss_group("float32", CUDA_CASES, device="cuda")
        _loss_group("bfloat16", CUDA_CASES, device="cuda")
        _loss_group("float64", CUDA_CASES[:3], device="cuda")
    else:
        raise SystemExit(f"unknown group {group!r}")


if __name__ == "__main__":
    if sys.argv[1] != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (via model.ntxent_triton)
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1])

"""`bench.py loss`: time, peak extra memory and accuracy of the NT-Xent loss, forward + backward, against the batch.

Methods (inputs z1, z2: (N, d) with requires_grad, 2N anchors, d = 128 by default; 128 and 256 on CUDA):
- ``reference``: eager ``nt_xent_reference`` (materialises the 2N x 2N logits);
- ``compiled``: ``torch.compile(nt_xent_reference)``;
- ``chunked``: ``nt_xent(..., backend="chunked")`` (PyTorch, row chunks of bounded memory);
- ``fused``: ``nt_xent(..., backend="triton")`` (fused Triton kernels; CUDA only);
- ``fused_tf32``: the same with ``float32_matmul_precision="tf32"`` (float32 inputs only; CUDA only).

Time: median over ``repeats`` forward + backward steps, after warm-up (two steps for ``compiled``, whose
first step compiles; one otherwise); CUDA steps are synchronised before the clock is read.

Peak extra memory (what the step needs beyond its inputs; it includes the inputs' gradients, 2 N d):
- CUDA: ``torch.cuda.max_memory_allocated()`` over one step (peak stats reset after warm-up) minus
  ``torch.cuda.memory_allocated()`` before it (the inputs).
- CPU: PyTorch's CPU allocations are invisible to tracemalloc, so each (method, size, d, dtype) runs in a
  fresh subprocess that times its steps, then switches glibc malloc to serve every block >= 64 KiB by
  mmap and return it at free (``mallopt(M_MMAP_THRESHOLD, 64 KiB)``, ``M_TRIM_THRESHOLD``, ``malloc_trim``),
  so that the resident set follows the live tensors; it then reads VmRSS, resets the peak
  (``echo 5 > /proc/self/clear_refs``), runs one step and reads VmHWM: extra = VmHWM - VmRSS before.
  Compilation, imports and warm-up are outside the window.

Accuracy (2N <= ``--check_max``): relative errors ||x - ref|| / ||ref|| of the loss and of the inputs'
gradients against ``nt_xent_reference`` in float64 on the same input values, outside the timed steps.

Work and floor (every record): the real operation count of *that* path, from its code (``work``):
matrix-product FLOPs (2 m n k each), exps, and the fewest bytes it must move through device memory;
over H100 SXM datasheet rates for the unit each path's products run on (bf16 tensor cores for 16-bit
inputs; FMA units for float32, TF32 tensor cores for ``fused_tf32``), the SFU ex2 rate and the HBM3
bandwidth; floor = the largest of the three (they can overlap). The achieved TFLOP/s column is the
path's real matrix-product FLOPs over its measured time. On the CPU the floor is what an H100 would
need at best (recorded for comparison, not drawn).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..common.cli import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("reference", "compiled", "chunked", "fused", "fused_tf32")
FUSED = ("fused", "fused_tf32")

# H100 SXM datasheet figures (NVIDIA H100 Tensor Core GPU datasheet / Hopper whitepaper), not measured.
H100_SXM_BF16_DENSE_FLOPS = 989e12  # bf16/fp16 tensor core, dense (no sparsity)
H100_SXM_TF32_DENSE_FLOPS = 494e12  # tf32 tensor core, dense
H100_SXM_FP32_FLOPS = 67e12  # fp32, non-tensor (FMA)
H100_SXM_HBM_BYTES_PER_S = 3.35e12
H100_SXM_SMS = 132
H100_SXM_SFU_EX2_PER_SM_PER_CLOCK = 16
H100_SXM_CLOCK_HZ = 1.83e9
H100_SXM_EX2_PER_S = H100_SXM_SFU_EX2_PER_SM_PER_CLOCK * H100_SXM_SMS * H100_SXM_CLOCK_HZ  # ~3.9e12

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() over one forward+backward step (peak reset after warm-up) "
    "minus torch.cuda.memory_allocated() before it (the inputs); includes the inputs' gradients",
    "cpu": "fresh subprocess per configuration; after warm-up and timing, glibc malloc is set to mmap every "
    "block >= 64 KiB and unmap it at free (mallopt M_MMAP_THRESHOLD/M_TRIM_THRESHOLD, malloc_trim), "
    "then extra = VmHWM after one forward+backward step - VmRSS before it, with the peak reset by "
    "writing 5 to /proc/self/clear_refs; includes the inputs' gradients",
}
TIMING_METHOD = (
    "median of `repeats` forward+backward steps (time.perf_counter, CUDA synchronised), after "
    "warm-up: 2 steps for 'compiled' (the first compiles), 1 otherwise"
)
FLOOR_METHOD = (
    "per path, from its code: matrix-product FLOPs (reference/compiled/chunked: 3 products of 2 (2N)^2 d - "
    "forward scores, backward grad_logits @ Z twice (reference) or recomputed scores and weights @ Z; "
    "fused: the backward recomputes the scores once per d slice of its grid), exps ((2N)^2 in the "
    "forward, (2N)^2 per recomputation in the backward) and the fewest HBM bytes (paths that "
    "materialise the (2N)^2 logits: written and read once in each pass, 4 (2N)^2 x itemsize; the "
    "others: inputs, gradients and partial sums); over H100 SXM datasheet rates: bf16 tensor cores "
    "(16-bit inputs), fp32 FMA (float32; torch.backends.cuda.matmul.allow_tf32 is recorded), TF32 "
    "tensor cores (fused_tf32), SFU ex2 16/SM/clock, HBM3 3.35 TB/s; floor = the largest. Datasheet "
    "figures: an estimate, recorded on every device"
)


# --------------------------------------------------------------------------- work and floor


def work(method: str, two_n: int, d: int, dtype: str) -> dict:
    """Real operation count of one forward+backward of ``method`` (single process): matrix-product FLOPs,
    exps, the fewest device-memory bytes, and the H100 rate its products run at."""
    pairs = float(two_n) ** 2
    itemsize = _itemsize(dtype)
    vectors = (
        2 * two_n * d * itemsize + 2 * two_n * d * 4
    )  # inputs in, gradients out (float32 inside)
    if method in FUSED:
        import torch

        from ..model.ntxent_triton import launch_grid

        precision = "tf32" if method == "fused_tf32" else "ieee"
        plan = launch_grid(
            two_n, two_n, d, getattr(torch, dtype), H100_SXM_SMS, float32_matmul_precision=precision
        )
        d_slices = plan.grad.grid[
            1
        ]  # each d slice of the gradient recomputes its scores (and their exps)
        flops = 2 * pairs * d + d_slices * 2 * pairs * d + 2 * pairs * d
        exps = pairs + d_slices * pairs
        partials = (
            4
            * two_n
            * (
                (plan.negatives.column_splits if plan.negatives.column_splits > 1 else 0)
                + d * (plan.grad.column_splits if plan.grad.column_splits > 1 else 0)
            )
        )
        moved = vectors + 2 * partials  # partial sums written, then read by the merge
    else:
        flops = 3 * 2 * pairs * d
        exps = 2 * pairs
        moved = vectors + (4 * pairs * itemsize if method in ("reference", "compiled") else 0)
    if dtype != "float32":
        rate, unit = H100_SXM_BF16_DENSE_FLOPS, "bf16 tensor cores"
    elif method == "fused_tf32":
        rate, unit = H100_SXM_TF32_DENSE_FLOPS, "tf32 tensor cores"
    else:
        rate, unit = H100_SXM_FP32_FLOPS, "fp32 FMA"
    return {
        "matmul_flops": flops,
        "exps": exps,
        "bytes": moved,
        "matmul_rate": rate,
        "matmul_unit": unit,
    }


def floor(method: str, two_n: int, d: int, dtype: str) -> dict:
    """Least time of one forward+backward of ``method`` on an H100 SXM (datasheet rates): the largest of
    products / their unit's rate, exps / the SFU rate, bytes / HBM bandwidth."""
    counts = work(method, two_n, d, dtype)
    times = {
        "matmul_ms": 1e3 * counts["matmul_flops"] / counts["matmul_rate"],
        "exp_ms": 1e3 * counts["exps"] / H100_SXM_EX2_PER_S,
        "bytes_ms": 1e3 * counts["bytes"] / H100_SXM_HBM_BYTES_PER_S,
    }
    return {
        **counts,
        **times,
        "floor_ms": max(times.values()),
        "bound": max(times, key=times.get).removesuffix("_ms"),
        "rates": {
            "ex2_per_s": H100_SXM_EX2_PER_S,
            "hbm_bytes_per_s": H100_SXM_HBM_BYTES_PER_S,
            "source": "H100 SXM datasheet figures",
        },
    }


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def estimate_bytes(method: str, two_n: int, d: int, dtype: str) -> int:
    """Rough peak extra memory, to skip what cannot fit. The eager reference holds ~2.6 (2N)^2 logit-sized
    matrices at once on CUDA (design notes: ~0.7 GB at 2N = 8192, fp32), 3.3 (fp32) to 3.6 (bf16) on CPU
    (measured here at 2N = 4096-16384); 4 is taken, and the same for the compiled reference (CPU: ~1)."""
    vectors = 8 * two_n * d * 4
    if method in ("reference", "compiled"):
        return 4 * two_n**2 * _itemsize(dtype) + vectors
    if method == "chunked":
        from ..model.ntxent_chunked import CHUNK_BYTES

        return 3 * min(CHUNK_BYTES, 8 * two_n**2) + vectors
    return vectors


def _available_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**40


def _gib(x: float) -> str:
    return f"{x / 2**30:.1f} GiB"


# --------------------------------------------------------------------------- one configuration


def _loss_fn(method: str, temperature: float):
    import torch

    from ..model.ntxent import nt_xent, nt_xent_reference

    if method == "reference":
        return lambda z1, z2: nt_xent_reference(z1, z2, temperature)
    if method == "compiled":
        # Fresh caches: dynamo caches per code object and falls back to eager past its recompile limit,
        # which a sweep over sizes and dtypes in one process would reach.
        torch._dynamo.reset()
        compiled = torch.compile(nt_xent_reference)
        return lambda z1, z2: compiled(z1, z2, temperature)
    if method == "chunked":
        return lambda z1, z2: nt_xent(z1, z2, temperature, backend="chunked")
    if method == "fused":
        return lambda z1, z2: nt_xent(z1, z2, temperature, backend="triton")
    if method == "fused_tf32":
        return lambda z1, z2: nt_xent(
            z1, z2, temperature, backend="triton", float32_matmul_precision="tf32"
        )
    raise ValueError(f"unknown method {method!r}: use one of {METHODS}")


def _sync(device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _step(fn, z1, z2):
    z1.grad = z2.grad = None
    loss = fn(z1, z2)
    loss.backward()
    return loss


def _proc_status_kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _cpu_peak_extra(step) -> int:
    """Bytes above the resident set that one call of ``step`` needs at its peak (see the module docstring)."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 64 * 1024)
    gc.collect()
    libc.malloc_trim(0)
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return 1024 * (_proc_status_kib("VmHWM") - before)


def _relative_errors(fn, z1, z2, temperature: float) -> dict:
    """||x - ref|| / ||ref|| of the loss and of the two gradients against float64 on the same input values."""
    import torch

    from ..model.ntxent import nt_xent_reference

    r1, r2 = (z.detach().double().requires_grad_() for z in (z1, z2))
    ref = nt_xent_reference(r1, r2, temperature)
    ref.backward()
    loss = _step(fn, z1, z2)

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))

    grad_error = max(rel(z1.grad, r1.grad), rel(z2.grad, r2.grad))
    out = {"rel_err_loss": rel(loss.detach(), ref.detach()), "rel_err_grad": grad_error}
    z1.grad = z2.grad = None
    del r1, r2, ref
    if z1.is_cuda:
        torch.cuda.empty_cache()
    return out


def measure(
    method: str,
    two_n: int,
    d: int,
    dtype: str,
    device: str,
    repeats: int,
    temperature: float = 0.1,
    seed: int = 0,
    check_max: int = 0,
) -> dict:
    """Time, peak extra memory and (2N <= check_max) accuracy of one configuration, in this process."""
    import torch

    n = two_n // 2
    gen = torch.Generator(device=device).manual_seed(seed)
    tdtype = getattr(torch, dtype)
    z1 = torch.randn(n, d, generator=gen, device=device, dtype=tdtype).requires_grad_()
    z2 = torch.randn(n, d, generator=gen, device=device, dtype=tdtype).requires_grad_()
    fn = _loss_fn(method, temperature)
    for _ in range(2 if method == "compiled" else 1):
        _step(fn, z1, z2)
    _sync(device)
    times, loss = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = _step(fn, z1, z2)
        _sync(device)
        times.append(time.perf_counter() - t0)
    result = {
        "time_ms": 1e3 * statistics.median(times),
        "times_ms": [1e3 * t for t in times],
        "loss": float(loss.detach()),
    }
    z1.grad = z2.grad = None
    loss = None
    if device == "cuda":
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(fn, z1, z2)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = _cpu_peak_extra(lambda: _step(fn, z1, z2))
    result.update(peak_extra_bytes=int(extra), peak_extra_mib=extra / 2**20)
    if two_n <= check_max:
        z1.grad = z2.grad = None
        result.update(_relative_errors(fn, z1, z2, temperature))
    return result


def _measure_subprocess(cfg: dict, timeout_s: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "simclr_dali.bench.loss", "--child", json.dumps(cfg)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {
        "status": "error",
        "reason": f"child exited {proc.returncode}: {proc.stderr.strip()[-1500:]}",
    }


# --------------------------------------------------------------------------- driver


def run(
    sizes,
    dtypes,
    methods,
    device: str,
    repeats: int,
    ds=(128,),
    temperature: float = 0.1,
    timeout_s: float = 1800.0,
    check_max: int = 8192,
    log=print,
) -> list[dict]:
    """One record per (method, d, dtype, 2N): time (median of repeats, ms), peak extra memory, achieved
    TFLOP/s, the path's H100 floor, errors against float64 (2N <= check_max), or why skipped."""
    import torch

    device = torch.device(device).type
    results = []
    for d in ds:
        for dtype in dtypes:
            for two_n in sizes:
                if two_n < 2 or two_n % 2:
                    raise ValueError(f"2N must be even and >= 2, got {two_n}")
                for method in methods:
                    record = {
                        "method": method,
                        "two_n": int(two_n),
                        "n": int(two_n) // 2,
                        "d": d,
                        "dtype": dtype,
                        "device": device,
                        "temperature": temperature,
                    }
                    record["floor"] = floor(
                        method, two_n, d, dtype
                    )  # H100 estimate, recorded on every device
                    need, free = estimate_bytes(method, two_n, d, dtype), _available_bytes(device)
                    if method in FUSED and device != "cuda":
                        record.update(
                            status="skipped", reason="the fused Triton backend needs CUDA"
                        )
                    elif method == "fused_tf32" and dtype != "float32":
                        record.update(
                            status="skipped", reason="TF32 applies to float32 inputs only"
                        )
                    elif need > 0.9 * free:
                        record.update(
                            status="skipped",
                            reason=f"{method} would need ~{_gib(need)}, {_gib(free)} free",
                        )
                    else:
                        cfg = dict(
                            method=method,
                            two_n=two_n,
                            d=d,
                            dtype=dtype,
                            device=device,
                            repeats=repeats,
                            temperature=temperature,
                            check_max=check_max,
                        )
                        if device == "cpu":
                            record.update(_measure_subprocess(cfg, timeout_s))
                        else:
                            try:
                                record.update(measure(**cfg))
                            except torch.cuda.OutOfMemoryError as error:
                                record.update(
                                    status="error",
                                    reason=f"out of memory: {str(error).splitlines()[0]}",
                                )
                            except Exception as error:  # recorded, and the sweep goes on
                                record.update(
                                    status="error",
                                    reason=f"{type(error).__name__}: {str(error)[:1500]}",
                                )
                            gc.collect()
                            torch.cuda.empty_cache()
                        record.setdefault("status", "ok")
                    if record["status"] == "ok":
                        record["achieved_tflops"] = (
                            record["floor"]["matmul_flops"] / (record["time_ms"] * 1e-3) / 1e12
                        )
                    results.append(record)
                    log(_line(record))
    return results


def _line(record: dict) -> str:
    head = (
        f"{record['method']:10s} {record['dtype']:8s} d={record['d']:<4d} 2N={record['two_n']:7d}:"
    )
    if record["status"] != "ok":
        return f"{head} {record['status']}: {record['reason']}"
    errors = ""
    if "rel_err_grad" in record:
        errors = f"  err loss {record['rel_err_loss']:.1e} grad {record['rel_err_grad']:.1e}"
    return (
        f"{head} {record['time_ms']:10.2f} ms  {record['achieved_tflops']:7.3f} TFLOP/s  "
        f"(H100 floor {record['floor']['floor_ms']:.3f} ms, {record['floor']['bound']})  "
        f"{record['peak_extra_mib']:9.1f} MiB extra  loss {record['loss']:.5f}{errors}"
    )


def table(results: list[dict]) -> str:
    """Markdown table of the finished records (time, achieved TFLOP/s, floor, memory, errors)."""
    lines = [
        "| method | dtype | d | 2N | time (ms) | TFLOP/s | H100 floor (ms) | time / floor | extra MiB | "
        "rel. err. grad |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["status"] != "ok":
            continue
        err = f"{r['rel_err_grad']:.1e}" if "rel_err_grad" in r else ""
        lines.append(
            f"| {r['method']} | {r['dtype']} | {r['d']} | {r['two_n']:,} | {r['time_ms']:.2f} | "
            f"{r['achieved_tflops']:.3f} | {r['floor']['floor_ms']:.3f} | "
            f"{r['time_ms'] / r['floor']['floor_ms']:.0f} | {r['peak_extra_mib']:.0f} | {err} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path, title: str = "") -> None:
    """Time and peak extra memory against 2N, log-log, one line per (method, dtype, d); on CUDA plots each
    line's H100 floor dotted in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    series = {}
    for r in results:
        if r.get("status") == "ok":
            series.setdefault((r["method"], r["dtype"], r["d"]), []).append(r)
    several_d = len({key[2] for key in series}) > 1
    for (method, dtype, d), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["two_n"])
        x = [r["two_n"] for r in rs]
        style = "-" if dtype == "float32" else "--"
        label = f"{method} {dtype}" + (f" d={d}" if several_d else "")
        (line,) = ax_t.plot(x, [r["time_ms"] for r in rs], style, marker="o", label=label)
        memory = [max(r["peak_extra_mib"], 1e-3) for r in rs]
        ax_m.plot(x, memory, style, marker="o", label=label, color=line.get_color())
        if rs[0]["device"] == "cuda":  # an H100 line belongs on an H100 plot only
            ax_t.plot(
                x, [r["floor"]["floor_ms"] for r in rs], ":", color=line.get_color(), alpha=0.6
            )
    on_cuda = any(r["device"] == "cuda" for rs in series.values() for r in rs)
    time_label = "forward+backward time (ms)" + ("; dotted: H100 floor" if on_cuda else "")
    for ax, label in ((ax_t, time_label), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(
            f"2N (anchors), d = {', '.join(str(d) for d in sorted({key[2] for key in series}))}"
        )
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _parser(cuda: bool) -> ArgumentParser:
    """The flags of `bench.py loss` (defaults depend on whether CUDA is there)."""
    parser = ArgumentParser(prog="bench.py loss", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        help="values of 2N (default: 4096 ... 131072 on CUDA, 1024 4096 8192 32768 65536 131072 on the CPU)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16", "float16"],
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--repeats",
        type=int,
        help="timed steps per configuration (default 20 on CUDA, 5 on the CPU)",
    )
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument(
        "--d",
        type=int,
        nargs="+",
        help="projection widths (default 128 256 on CUDA, 128 on the CPU)",
    )
    parser.add_argument("--temperature", type=float, default=0.1)
    check_help = "largest 2N whose errors against float64 are measured"
    parser.add_argument("--check_max", type=int, default=8192, help=check_help)
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per CPU configuration"
    )
    parser.add_argument(
        "--json", default=None, help="default bench/results/loss_<device tag>.json (cpu, h100, ...)"
    )
    parser.add_argument("--plot", default=None, help="default: the JSON path with .png")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def _payload(args, device: str, ds: list[int], repeats: int, results: list[dict]) -> dict:
    """The JSON written by `bench.py loss`: the environment, the methods and constants, then the results."""
    import torch

    from .common import environment

    return {
        "benchmark": "NT-Xent loss, forward+backward",
        "environment": environment(),
        "device": device,
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,  # the reference's float32 products on CUDA
        "d": ds,
        "temperature": args.temperature,
        "repeats": repeats,
        "timing_method": TIMING_METHOD,
        "memory_method": MEMORY_METHOD[device]
        if device in MEMORY_METHOD
        else MEMORY_METHOD["cuda"],
        "accuracy_method": f"2N <= {args.check_max}: ||x - ref|| / ||ref|| of the loss and of the worse of the two "
        "input gradients, ref = nt_xent_reference in float64 on the same input values",
        "floor_method": FLOOR_METHOD,
        "floor_constants": {
            "H100_SXM_BF16_DENSE_FLOPS": H100_SXM_BF16_DENSE_FLOPS,
            "H100_SXM_TF32_DENSE_FLOPS": H100_SXM_TF32_DENSE_FLOPS,
            "H100_SXM_FP32_FLOPS": H100_SXM_FP32_FLOPS,
            "H100_SXM_EX2_PER_S": H100_SXM_EX2_PER_S,
            "H100_SXM_HBM_BYTES_PER_S": H100_SXM_HBM_BYTES_PER_S,
            "ex2": f"{H100_SXM_SFU_EX2_PER_SM_PER_CLOCK}/SM/clock x {H100_SXM_SMS} SMs x {H100_SXM_CLOCK_HZ / 1e9} GHz",
            "source": "datasheet figures, not measured",
        },
        "results": results,
    }


def main(argv=None) -> list[dict]:
    """CLI of `bench.py loss`: measure, write the JSON (and the plot), print a table."""
    import torch

    args = _parser(torch.cuda.is_available()).parse_args(argv)
    if args.child:  # one CPU configuration in a fresh process (see the module docstring)
        try:
            out = measure(**json.loads(args.child))
        except Exception as error:  # reported, not raised: the parent records it
            out = {"status": "error", "reason": f"{type(error).__name__}: {error}"}
        print("RESULT " + json.dumps(out), flush=True)
        return [out]
    from .common import device_tag

    device = torch.device(args.device).type
    on_cuda = device == "cuda"
    cpu_sizes = [1024, 4096, 8192, 32768, 65536, 131072]
    sizes = args.sizes or ([4096, 8192, 16384, 32768, 65536, 131072] if on_cuda else cpu_sizes)
    ds = args.d or ([128, 256] if on_cuda else [128])
    repeats = args.repeats or (20 if on_cuda else 5)
    results = run(
        sizes,
        args.dtypes,
        args.methods,
        device,
        repeats,
        ds=ds,
        temperature=args.temperature,
        timeout_s=args.timeout,
        check_max=args.check_max,
    )
    json_path = Path(
        args.json or ROOT / "bench" / "results" / f"loss_{device_tag() if on_cuda else 'cpu'}.json"
    )
    plot_path = Path(args.plot or json_path.with_suffix(".png"))
    payload = _payload(args, device, ds, repeats, results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    plot(results, plot_path, title=f"NT-Xent forward+backward, {payload['device_name']}")
    print(table(results))
    print(f"wrote {json_path} and {plot_path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

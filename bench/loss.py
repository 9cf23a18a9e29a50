"""`bench.py loss`: time and peak extra memory of the NT-Xent loss, forward + backward, against the batch.

Methods (inputs z1, z2: (N, d) with requires_grad, 2N anchors, d = 128 by default):
- ``reference``: eager ``nt_xent_reference`` (materialises the 2N x 2N logits);
- ``compiled``: ``torch.compile(nt_xent_reference)``;
- ``chunked``: ``nt_xent(..., backend="chunked")`` (PyTorch, row chunks of bounded memory);
- ``fused``: ``nt_xent(..., backend="triton")`` (fused Triton kernels; CUDA only).

Time: median over ``repeats`` forward + backward steps, after warm-up (two steps for ``compiled``, whose
first step compiles; one otherwise); CUDA steps are synchronised before the clock is read.

Peak extra memory (what the step needs beyond its inputs; it includes the inputs' gradients, 2 N d):
- CUDA: ``torch.cuda.max_memory_allocated()`` over one step (peak stats reset after warm-up) minus
  ``torch.cuda.memory_allocated()`` before it (the inputs).
- CPU: PyTorch's CPU allocations are invisible to tracemalloc, so each (method, size, dtype) runs in a
  fresh subprocess that times its steps, then switches glibc malloc to serve every block >= 64 KiB by
  mmap and return it at free (``mallopt(M_MMAP_THRESHOLD, 64 KiB)``, ``M_TRIM_THRESHOLD``, ``malloc_trim``),
  so that the resident set follows the live tensors; it then reads VmRSS, resets the peak
  (``echo 5 > /proc/self/clear_refs``), runs one step and reads VmHWM: extra = VmHWM - VmRSS before.
  Compilation, imports and warm-up are outside the window.

A configuration whose estimated memory exceeds what is free (GPU: ``torch.cuda.mem_get_info``; CPU:
MemAvailable) is recorded as skipped with the reason, not run.

Floor (CUDA results): the least time the loss's arithmetic needs on an H100 SXM, from datasheet figures
(below), whatever GPU ran it: FLOPs = 3 matmuls of 2 (2N)^2 d each (forward S = Z Z^T for the lse;
backward recomputes S and multiplies the (2N x 2N) weights by Z) = 6 (2N)^2 d, over the dense bf16 tensor
rate for 16-bit inputs or the fp32 non-tensor rate for float32 (the fused backend's float32 products are
"ieee", not TF32); exps = 2 (2N)^2 (one per pair in the forward, one in the backward) over the SFU ex2
rate. floor = max of the two (they can overlap).
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

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("reference", "compiled", "chunked", "fused")

# H100 SXM datasheet figures (NVIDIA H100 Tensor Core GPU datasheet / Hopper whitepaper), not measured.
H100_SXM_BF16_DENSE_FLOPS = 989e12  # bf16 tensor core, dense (no sparsity)
H100_SXM_FP32_FLOPS = 67e12  # fp32, non-tensor (FMA)
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
TIMING_METHOD = ("median of `repeats` forward+backward steps (time.perf_counter, CUDA synchronised), after "
                 "warm-up: 2 steps for 'compiled' (the first compiles), 1 otherwise")


# --------------------------------------------------------------------------- estimates


def floor(two_n: int, d: int, dtype: str) -> dict:
    """Arithmetic lower bound of one forward+backward on an H100 SXM (datasheet rates)."""
    flops = 6.0 * two_n**2 * d
    exps = 2.0 * two_n**2
    rate = H100_SXM_FP32_FLOPS if dtype == "float32" else H100_SXM_BF16_DENSE_FLOPS
    t_matmul, t_exp = flops / rate, exps / H100_SXM_EX2_PER_S
    return {"flops": flops, "exps": exps, "matmul_ms": 1e3 * t_matmul, "exp_ms": 1e3 * t_exp,
            "floor_ms": 1e3 * max(t_matmul, t_exp),
            "rates": {"matmul_flops_per_s": rate, "ex2_per_s": H100_SXM_EX2_PER_S, "source": "H100 SXM datasheet figures"}}


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
        from model.ntxent import CHUNK_BYTES

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

    from model.ntxent import nt_xent, nt_xent_reference

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


def measure(method: str, two_n: int, d: int, dtype: str, device: str, repeats: int, temperature: float = 0.1,
            seed: int = 0) -> dict:
    """Time and peak extra memory of one configuration, in this process."""
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
    result = {"time_ms": 1e3 * statistics.median(times), "times_ms": [1e3 * t for t in times], "loss": float(loss.detach())}
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
    return result


def _measure_subprocess(cfg: dict, timeout_s: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.loss", "--child", json.dumps(cfg)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"status": "error", "reason": f"child exited {proc.returncode}: {proc.stderr.strip()[-1500:]}"}


# --------------------------------------------------------------------------- driver


def run(sizes, dtypes, methods, device: str, repeats: int, d: int = 128, temperature: float = 0.1,
        timeout_s: float = 1800.0, log=print) -> list[dict]:
    """One record per (method, dtype, 2N): time (median of repeats, ms), peak extra memory, or why skipped."""
    import torch

    device = torch.device(device).type
    results = []
    for dtype in dtypes:
        for two_n in sizes:
            if two_n < 2 or two_n % 2:
                raise ValueError(f"2N must be even and >= 2, got {two_n}")
            for method in methods:
                record = {"method": method, "two_n": int(two_n), "n": int(two_n) // 2, "d": d, "dtype": dtype,
                          "device": device, "temperature": temperature}
                record["floor"] = floor(two_n, d, dtype)  # the H100 estimate, recorded on every device for comparison
                need, free = estimate_bytes(method, two_n, d, dtype), _available_bytes(device)
                if method == "fused" and device != "cuda":
                    record.update(status="skipped", reason="the fused Triton backend needs CUDA")
                elif need > 0.9 * free:
                    record.update(status="skipped", reason=f"{method} would need ~{_gib(need)}, {_gib(free)} free")
                else:
                    cfg = dict(method=method, two_n=two_n, d=d, dtype=dtype, device=device, repeats=repeats,
                               temperature=temperature)
                    if device == "cpu":
                        record.update(_measure_subprocess(cfg, timeout_s))
                    else:
                        try:
                            record.update(measure(**cfg))
                        except torch.cuda.OutOfMemoryError as error:
                            record.update(status="error", reason=f"out of memory: {str(error).splitlines()[0]}")
                        except Exception as error:  # recorded, and the sweep goes on
                            record.update(status="error", reason=f"{type(error).__name__}: {str(error)[:1500]}")
                        gc.collect()
                        torch.cuda.empty_cache()
                    record.setdefault("status", "ok")
                results.append(record)
                if record["status"] == "ok":
                    log(f"{method:9s} {dtype:8s} 2N={two_n:7d}: {record['time_ms']:10.2f} ms  "
                        f"{record['peak_extra_mib']:9.1f} MiB extra  loss {record['loss']:.5f}")
                else:
                    log(f"{method:9s} {dtype:8s} 2N={two_n:7d}: {record['status']}: {record['reason']}")
    return results


def plot(results: list[dict], path, title: str = "") -> None:
    """Time and peak extra memory against 2N, log-log, one line per (method, dtype); the H100 floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    series = {}
    for r in results:
        if r.get("status") == "ok":
            series.setdefault((r["method"], r["dtype"]), []).append(r)
    for (method, dtype), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["two_n"])
        x = [r["two_n"] for r in rs]
        style = "-" if dtype == "float32" else "--"
        ax_t.plot(x, [r["time_ms"] for r in rs], style, marker="o", label=f"{method} {dtype}")
        ax_m.plot(x, [max(r["peak_extra_mib"], 1e-3) for r in rs], style, marker="o", label=f"{method} {dtype}")
    floors = {}
    for r in results:
        if r.get("floor") and r["device"] == "cuda":  # an H100 line belongs on an H100 plot only
            floors.setdefault(r["dtype"], {})[r["two_n"]] = r["floor"]["floor_ms"]
    for dtype, pts in sorted(floors.items()):
        x = sorted(pts)
        ax_t.plot(x, [pts[v] for v in x], ":", color="gray", label=f"H100 floor {dtype} (datasheet)")
    for ax, label in ((ax_t, "forward+backward time (ms)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("2N (anchors), d = %s" % (results[0]["d"] if results else "?"))
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
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def main(argv=None) -> list[dict]:
    """CLI of `bench.py loss`: measure, write the JSON (and the plot)."""
    import torch

    parser = argparse.ArgumentParser(prog="bench.py loss", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192, 32768, 65536, 131072], help="values of 2N")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per CPU configuration")
    parser.add_argument("--json", default=None, help="default bench/results/loss_<device>.json")
    parser.add_argument("--plot", default=None, help="default bench/results/loss_<device>.png")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one CPU configuration in a fresh process (see the module docstring)
        try:
            out = measure(**json.loads(args.child))
        except Exception as error:  # reported, not raised: the parent records it
            out = {"status": "error", "reason": f"{type(error).__name__}: {error}"}
        print("RESULT " + json.dumps(out), flush=True)
        return [out]
    from .common import environment

    device = torch.device(args.device).type
    results = run(args.sizes, args.dtypes, args.methods, device, args.repeats, d=args.d,
                  temperature=args.temperature, timeout_s=args.timeout)
    json_path = Path(args.json or ROOT / "bench" / "results" / f"loss_{device}.json")
    plot_path = Path(args.plot or json_path.with_suffix(".png"))
    payload = {
        "benchmark": "NT-Xent loss, forward+backward",
        "environment": environment(),
        "device": device,
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "d": args.d,
        "temperature": args.temperature,
        "repeats": args.repeats,
        "timing_method": TIMING_METHOD,
        "memory_method": MEMORY_METHOD[device] if device in MEMORY_METHOD else MEMORY_METHOD["cuda"],
        "floor_method": ("6 (2N)^2 d FLOPs (3 matmuls: forward scores, backward recomputed scores and weights @ Z) "
                         "over the H100 SXM dense bf16 rate (16-bit inputs) or fp32 non-tensor rate (float32); "
                         "2 (2N)^2 exps over the SFU ex2 rate; floor = max. Datasheet figures: an estimate, recorded on every "
                         "device (on the CPU it is what an H100 would need at best, not a measurement)"),
        "floor_constants": {"H100_SXM_BF16_DENSE_FLOPS": H100_SXM_BF16_DENSE_FLOPS,
                            "H100_SXM_FP32_FLOPS": H100_SXM_FP32_FLOPS, "H100_SXM_EX2_PER_S": H100_SXM_EX2_PER_S,
                            "ex2": f"{H100_SXM_SFU_EX2_PER_SM_PER_CLOCK}/SM/clock x {H100_SXM_SMS} SMs x "
                                   f"{H100_SXM_CLOCK_HZ / 1e9} GHz", "source": "datasheet figures, not measured"},
        "results": results,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    plot(results, plot_path, title=f"NT-Xent forward+backward, d={args.d}, {payload['device_name']}")
    print(f"wrote {json_path} and {plot_path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

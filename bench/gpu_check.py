"""``simclr-bench gpu-check``: the data path, the kernels and the throughput on your own GPU, in one command.

What a user with a GPU wants to see on their own machine, in this order: the data path (DALI's numba plugin,
the training graphs of both presets built on the GPU and timed against torchvision over a DALI threads sweep:
``bench.py pipeline --device cuda``), the fused Triton NT-Xent kernels against float64 in the production
configurations, and the model's training throughput on a synthetic feed.
No fixed time budget: each part takes what it takes; results go to bench/results/gpu_check_<device>.json.

    simclr-bench gpu-check                      # all three parts, on the GPU
    simclr-bench gpu-check --threads 4 8 16     # the DALI threads to sweep (default: 4, 8 and the usable cores)
    simclr-bench gpu-check --small              # the same on the CPU at tiny sizes (kernels: Triton interpreter)

The device-lending tooling (staging pieces onto a bare machine, the 15-minute plan) is tools/gpu_check in the
checkout, never installed (bench/GPU_CHECK.md); it runs these same kernel cases.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from ..common.cli import ArgumentParser
from .common import write_result

# The production configurations only (each a (dtype, float32 matmul precision, d, 2N) the presets or the
# benchmarks run): at most ~12 Triton specialisations compiled cold (KERNEL_SPECIALISATIONS_MAX).
KERNEL_CASES = (
    ("bfloat16", "ieee", 128, 8192, "configs/imagenet.yaml: batch 4096, bf16"),
    ("bfloat16", "ieee", 128, 1024, "configs/cifar10.yaml: batch 512, bf16"),
    ("bfloat16", "ieee", 128, 131072, "bench.py loss's largest 2N"),
    ("float32", "ieee", 128, 1024, "precision: no"),
)
KERNEL_SPECIALISATIONS_MAX = 12
KERNEL_TOL = {
    "bfloat16": 2e-2,
    "float16": 5e-3,
    "float32": 1e-4,
    "tf32": 5e-2,
}  # as tests/test_ntxent_triton.py
FP16_LOSS_SCALE = 2.0**16  # as GradScaler: float16 gradients of a large batch underflow unscaled
DRY_KERNEL_SIZE = (64, 32)  # (2N, d) of each case under the interpreter


def kernel_specialisations(cases=KERNEL_CASES, sm_count: int = 132) -> list[tuple]:
    """The distinct compiled kernels the cases need (kernel, dtype, constexpr tiles), from the pure launch plan:
    what the check compiles cold, counted without a GPU."""
    import torch

    from ..model import ntxent_triton as nt

    keys: set[tuple] = set()
    for dtype_name, precision, d, two_n, _ in cases:
        dtype = getattr(torch, dtype_name)
        operands = dtype if dtype != torch.float32 else torch.float32
        plan = nt.launch_grid(two_n, two_n, d, dtype, sm_count, float32_matmul_precision=precision)
        prec = precision if dtype == torch.float32 else "16-bit"
        for kernel, launch in (("row_negatives", plan.negatives), ("row_grad", plan.grad)):
            tiles = (
                launch.block_m,
                launch.block_n,
                launch.block_k,
                launch.block_d,
                launch.num_warps,
                launch.num_stages,
            )
            keys.add((kernel, dtype_name, prec, tiles))
        row_block = nt._row_block(d, torch.float32)
        keys.add(("normalize", dtype_name, str(operands), row_block))
        keys.add(("positive_stats", "float32", "", row_block))
        keys.add(("input_grad", dtype_name, "", row_block))
    return sorted(keys)


KERNEL_NAMES = (
    "_normalize_kernel",
    "_row_negatives_kernel",
    "_positive_stats_kernel",
    "_row_grad_kernel",
    "_input_grad_kernel",
)


def compiled_count() -> dict:
    """Specialisations in each Triton kernel's in-memory cache, after the cases ran on CUDA (None where this
    Triton keeps them elsewhere). Triton 3.x: ``device_caches[device][0]`` maps a specialisation to its kernel."""
    from ..model import ntxent_triton as nt

    counts: dict[str, int | None] = {}
    for name in KERNEL_NAMES:
        caches = getattr(getattr(nt, name, None), "device_caches", None)
        try:
            counts[name] = None if caches is None else sum(len(v[0]) for v in caches.values())
        except (AttributeError, TypeError, IndexError):
            counts[name] = None
    return counts


def kernel_case(
    torch, device: str, i: int, dtype_name: str, precision: str, d: int, two_n: int, why: str
) -> dict:
    """One production configuration: the fused loss and gradients against float64 on the same inputs."""
    from ..model.ntxent import nt_xent, nt_xent_reference

    dtype, n, tau = getattr(torch, dtype_name), two_n // 2, 0.1
    gen = torch.Generator(device=device).manual_seed(100 + i)
    z1 = torch.randn(n, d, generator=gen, device=device).to(dtype)
    z2 = (0.2 * z1.float() + torch.randn(n, d, generator=gen, device=device)).to(dtype)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    scale = FP16_LOSS_SCALE if dtype == torch.float16 else 1.0
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = nt_xent(a1, a2, tau, backend="triton", float32_matmul_precision=precision)
    (loss * scale).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start  # compile (cold) + run
    r1, r2 = z1.double().requires_grad_(), z2.double().requires_grad_()
    if two_n <= 16384:
        ref, reference = nt_xent_reference(r1, r2, tau), "nt_xent_reference, float64"
    else:  # the dense float64 matrix would not fit: the row-chunked PyTorch backend in float64
        ref, reference = nt_xent(r1, r2, tau, backend="chunked"), "chunked backend, float64"
    ref.backward()

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))

    errors = {
        "rel_err_loss": rel(loss.detach(), ref.detach()),
        "rel_err_grad": max(rel(a1.grad / scale, r1.grad), rel(a2.grad / scale, r2.grad)),
    }
    tol = KERNEL_TOL["tf32" if precision == "tf32" else dtype_name]
    finite = bool(torch.isfinite(loss).item() and torch.isfinite(a1.grad).all().item())
    return {
        "why": why,
        "dtype": dtype_name,
        "precision": precision,
        "d": d,
        "two_n": two_n,
        "device": device,
        "reference": reference,
        "first_call_s": round(first_call_s, 3),
        **errors,
        "tol": tol,
        "ok": finite and max(errors.values()) < tol,
    }


def kernel_rows(small: bool = False):
    """One row per production case (the loss and gradients against float64), then, on CUDA, the number of
    compiled specialisations: what the fused kernels are worth on this device. ``small``: 2N, d = DRY_KERNEL_SIZE."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for i, (dtype_name, precision, d, two_n, why) in enumerate(KERNEL_CASES):
        if small:
            two_n, d = DRY_KERNEL_SIZE
        case = f"{dtype_name} {precision} d={d} 2N={two_n}"
        try:
            yield {
                "case": case,
                **kernel_case(torch, device, i, dtype_name, precision, d, two_n, why),
            }
        except Exception as error:  # recorded; the next case still runs
            yield {
                "case": case,
                "ok": False,
                "error": f"{type(error).__name__}: {str(error)[:1500]}",
            }
        if device == "cuda":
            torch.cuda.empty_cache()
    if device == "cuda":
        counts = compiled_count()
        known = [c for c in counts.values() if c is not None]
        yield {
            "case": "compiled specialisations",
            "per_kernel": counts,
            "total": sum(known) if known else None,
            "predicted": len(kernel_specialisations()),
            "max": KERNEL_SPECIALISATIONS_MAX,
            # informational, not a pass/fail: Triton also specialises integer arguments equal to 1 (a launch
            # with one column split), which the prediction from the tile table does not count
            "note": "predicted from the tile table; integer arguments equal to 1 add specialisations",
        }


def default_threads() -> list[int]:
    """The DALI threads to sweep: 4 (the loader's old cap), 8 and every usable core, as far as the host has them."""
    cores = len(os.sched_getaffinity(0))
    return sorted({t for t in (4, 8, cores) if t <= cores} or {cores})


def pipeline_commands(base: list[str], threads: list[int]) -> list[list[str]]:
    """``bench.py pipeline`` argument lists for a DALI threads sweep: one call with ``--threads`` where the
    benchmark takes it (it then sweeps itself), else one call per count with ``--cores``."""
    source = (Path(__file__).with_name("pipeline.py")).read_text()
    if '"--threads"' in source:
        return [[*base, "--threads", *map(str, threads)]]
    return [[*base, "--cores", str(t)] for t in threads]


def data_path(device: str, threads: list[int], seconds: float, small: bool, work: Path) -> dict:
    """DALI's numba plugin imported first (the CPU colour stage needs it; a broken numba shows here, not mid-run),
    then the training graphs of both presets built on ``device`` and timed against torchvision per thread count."""
    from . import pipeline

    result: dict = {"numba_plugin": import_numba_plugin(), "runs": []}
    base = ["--device", device, "--runs", "1", "--seconds", str(seconds)]
    if small:
        imagenet, _ = pipeline.synthetic_shards(work / "imagenet", 32, 96, "generated")
        cifar, _ = pipeline.synthetic_shards(work / "cifar", 64, 32, "generated")
        base += [
            "--imagenet_shards",
            str(imagenet),
            "--cifar_shards",
            str(cifar),
            "--batch_size",
            "16",
        ]
    for k, argv in enumerate(pipeline_commands(base, threads)):
        saved = pipeline.main([*argv, "--json", str(work / f"pipeline_{k}.json")])
        result["runs"].append({"argv": argv, "results": saved})
    return result


def import_numba_plugin() -> str:
    try:
        import numba
        import nvidia.dali.plugin.numba  # noqa: F401

        return f"ok (numba {numba.__version__})"
    except Exception as error:  # recorded: the data path below names what breaks
        return f"{type(error).__name__}: {error}"


def throughput(small: bool) -> dict:
    """The model's training images/s on a synthetic device-resident feed (bench.py model): the upper bound the
    data path has to feed."""
    from .train import main as train_main

    args = ["--feeds", "synthetic", "--json", os.devnull]
    if small:
        tiny = {
            "backbone": "resnet18",
            "image_size": 32,
            "timm_kwargs": {"channels": [8, 16, 32, 64]},
        }
        args += ["--preset", "cifar", "--batch_size", "8", "--steps", "2", "--warmup", "1"]
        args += ["--overrides", json.dumps(tiny)]
    return train_main(args)


PARTS = ("data", "kernels", "throughput")


def main(argv=None) -> int:
    parser = ArgumentParser(prog="simclr-bench gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None, help="DALI threads to sweep"
    )
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="measured time per pipeline and thread count"
    )
    parser.add_argument("--skip", nargs="+", default=[], choices=PARTS, help="parts not to run")
    parser.add_argument(
        "--small", action="store_true", help="on the CPU at tiny sizes (a check of the command)"
    )
    parser.add_argument(
        "--json", default=None, help="default bench/results/gpu_check_<device>.json"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if (
        args.small
    ):  # before torch and Triton are imported: CPU devices, kernels under the interpreter
        os.environ["CUDA_VISIBLE_DEVICES"], os.environ["TRITON_INTERPRET"] = "", "1"
    import torch

    if not (torch.cuda.is_available() or args.small):
        print(
            "simclr-bench gpu-check: no CUDA device here (--small runs it on the CPU at tiny sizes)",
            file=sys.stderr,
        )
        return 2
    device, start = ("cpu" if args.small else "cuda"), time.time()
    report: dict = {"parts": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        steps = {
            "data": lambda: data_path(
                device, args.threads or default_threads(), args.seconds, args.small, Path(work)
            ),
            "kernels": lambda: list(kernel_rows(args.small)),
            "throughput": lambda: throughput(args.small),
        }
        for part in (p for p in PARTS if p not in args.skip):
            print(f"[gpu-check] {part} ...", flush=True)
            report["parts"][part] = steps[part]()
    kernels = report["parts"].get("kernels", [])
    report["kernels_ok"] = all(row.get("ok", True) for row in kernels)
    report["seconds"] = round(time.time() - start, 1)
    path = write_result("gpu_check", {"device": device, **report}, args.json)
    print(
        f"[gpu-check] kernels {'within' if report['kernels_ok'] else 'OUT OF'} tolerance; wrote {path}"
    )
    return 0 if report["kernels_ok"] else 1

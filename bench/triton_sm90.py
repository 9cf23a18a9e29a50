"""Hopper (sm_90a) compile report of every production Triton kernel launch, without a GPU.

    python bench.py triton-sm90 [--versions 3.6.0 ...] [--out bench/results/triton_sm90.json]

Each case is one kernel launch with the signature, constexprs and options the JIT would give it, compiled
ahead of time by ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` with the ptxas that
Triton bundles (no driver needed). Per case: registers and spill bytes (the ptxas -v log of Triton's own
ptxas run), shared memory (Triton's metadata), CTAs per SM and occupancy on an H100 (CUDA's occupancy rules,
``h100_occupancy``), ``wgmma.mma_async`` in the PTX and HGMMA/HMMA/MUFU.EX2 in the SASS (nvdisasm). Each
Triton version compiles in its own process: the pinned one from this environment, another from a throwaway
``pip install --no-deps --target`` of its wheel (``triton_site``: cached under /tmp, never in the venv).

The table is ``CASE_SOURCES``: a name -> a function returning ``CompileCase``s. The NT-Xent kernels' cases
are captured from real loss steps (``nt_xent`` forward + backward with each launch recorded instead of run,
so the tiles are launch_grid's) over ``NTXENT_CONFIGS``; the colour kernel's from real ``colour_batch`` calls
over ``COLOUR_CONFIGS`` (224 and 32 px views). Another kernel is one more entry: a function that returns
literal cases, e.g. ``CompileCase(kernel="pipeline.colour_gpu:_colour_kernel", signature={"src":
"*u8", "n": "i32"}, constexprs={"BLOCK": 1024}, options={"num_warps": 4}, aligned=("src", "n"))``, or
``case_from_launch(kernel, args, kwargs)`` of launches captured as ``ntxent_cases`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "triton_sm90.json"
GPU_MACHINE_TRITON = "3.6.0"  # the lent GPU machine's Triton (compiled for beside the pinned one)
TRITON_CACHE = Path(os.environ.get("SIMCLR_TRITON_CACHE", "/tmp/simclr-triton-wheels"))

# H100 SXM (sm_90) resources, as CUDA's occupancy calculator (cuda_occupancy.h) counts them.
H100 = {
    "sms": 132,
    "registers_per_sm": 65536,
    "register_sub_partitions": 4,
    "register_granularity": 256,  # registers per warp are allocated in units of 256
    "max_registers_per_thread": 255,
    "max_warps_per_sm": 64,
    "max_ctas_per_sm": 32,
    "shared_per_sm": 228 * 1024,  # the largest carve-out
    "shared_per_block": 227 * 1024,  # opt-in maximum of one block
    "shared_reserved_per_block": 1024,  # CUDA reserves 1 KB per block since sm_80
    "shared_granularity": 128,
}


@dataclasses.dataclass(frozen=True)
class CompileCase:
    """One launch to compile. ``kernel``: a ``triton.jit`` function or "module:attribute". ``signature``: the
    Triton type of each non-constexpr parameter ("*bf16", "i32", "fp32"; "constexpr" for JIT-specialised
    ones, whose values are in ``constexprs`` too). ``aligned``: parameters the JIT sees 16-divisible (tensor
    pointers, integers % 16 == 0). ``config``: what the launch stands for (reported). ``tensor_cores``: the
    products must (True) or must not (False) run on the tensor cores; ``exp2``: exp2 on the SFU expected;
    ``max_spill_bytes``: the register spill (ptxas's spill stores) the kernel's tile choice accepts."""

    kernel: object
    signature: dict
    constexprs: dict
    options: dict
    aligned: tuple = ()
    config: dict = dataclasses.field(default_factory=dict)
    grid: tuple = ()
    tensor_cores: bool = False
    exp2: bool = False
    max_spill_bytes: int = 0

    @property
    def name(self) -> str:
        return _resolve(self.kernel).__name__.strip("_")

    def key(self) -> str:
        """Identical compilations share a key (configs that launch the same specialisation compile once)."""
        parts = (
            self.name,
            sorted(self.signature.items()),
            sorted(map(str, self.constexprs.items())),
        )
        return hashlib.sha256(
            repr((parts, sorted(self.options.items()), sorted(self.aligned))).encode()
        ).hexdigest()


def _resolve(kernel):
    if isinstance(kernel, str):
        module, _, attribute = kernel.partition(":")
        return getattr(importlib.import_module(module), attribute)
    return kernel


def case_from_launch(kernel, args: tuple, kwargs: dict, **fields) -> CompileCase:
    """The case of ``kernel[grid](*args, **kwargs)``, specialised by the JIT's own rules (Triton's
    native_specialize_impl: pointer and integer alignment, integers equal to 1 as constexprs)."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    values = dict(
        zip(kernel.arg_names, args), **{k: v for k, v in kwargs.items() if k in kernel.arg_names}
    )
    signature, constexprs, aligned = {}, {}, []
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(
            CUDABackend,
            value,
            False,
            not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )[:2]
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = spec
        elif spec == "D":
            aligned.append(param.name)
    options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
    return CompileCase(kernel, signature, constexprs, options, tuple(aligned), **fields)


# --------------------------------------------------------------------------- the NT-Xent kernels

NTXENT_PRECISIONS = (
    ("bfloat16", "ieee"),
    ("float16", "ieee"),
    ("float32", "ieee"),
    ("float32", "tf32"),
)
NTXENT_CONFIGS = [
    {"dtype": dtype, "precision": precision, "d": d, "rows": rows}
    for dtype, precision in NTXENT_PRECISIONS
    for d in (128, 256)
    for rows in (512, 1024, 8192, 131072)  # 2N on one GPU
]
NTXENT_PRODUCT_KERNELS = ("row_negatives_kernel", "row_grad_kernel")
# The spills the tile table accepts (model/ntxent_triton.py's _cuda_tiles says the same); none elsewhere. The
# exact-float32 gradient holds its scores and (BLOCK_M, BLOCK_D) float32 accumulator in registers: Triton 3.8
# spills 32 bytes there (3.6: none).
NTXENT_MAX_SPILL_BYTES = {("row_grad_kernel", "float32", "ieee"): 32}


def ntxent_cases(configs=None) -> list[CompileCase]:
    """Every launch of one loss step (forward + backward) per config, as ``nt_xent`` makes them on an H100:
    the real launchers run on CPU tensors (never touched: torch.empty pages are not written) with each
    launch recorded instead of run."""
    import torch

    from ..model import ntxent, ntxent_triton

    captured = []
    hooks = {
        "_launch": lambda kernel, grid, *args, **kwargs: captured.append(
            (kernel, tuple(grid), args, kwargs)
        ),
        "_require_cuda": lambda *tensors: None,
        "_sm_count": lambda device: H100["sms"],
    }
    saved = {name: getattr(ntxent_triton, name) for name in hooks}
    cases = []
    try:
        for name, hook in hooks.items():
            setattr(ntxent_triton, name, hook)
        for config in configs or NTXENT_CONFIGS:
            dtype = getattr(torch, config["dtype"])
            captured.clear()
            z1, z2 = (
                torch.ones(config["rows"] // 2, config["d"], dtype=dtype).requires_grad_()
                for _ in range(2)
            )
            loss = ntxent.nt_xent(
                z1, z2, 0.1, backend="triton", float32_matmul_precision=config["precision"]
            )
            loss.backward()
            tensor_cores = config["dtype"] != "float32" or config["precision"] == "tf32"
            for kernel, grid, args, kwargs in captured:
                name = kernel.__name__.strip("_")
                product = name in NTXENT_PRODUCT_KERNELS
                spill = NTXENT_MAX_SPILL_BYTES.get((name, config["dtype"], config["precision"]), 0)
                cases.append(
                    case_from_launch(
                        kernel,
                        args,
                        kwargs,
                        config=dict(config),
                        grid=grid,
                        tensor_cores=product and tensor_cores,
                        exp2=product,
                        max_spill_bytes=spill,
                    )
                )
    finally:
        for name, original in saved.items():
            setattr(ntxent_triton, name, original)
    return cases


# --------------------------------------------------------------------------- the colour kernel

# One launch per view of a pipeline batch (grid = (views,)): the paper's ImageNet views and CIFAR-10 views.
COLOUR_CONFIGS = [
    {"preset": "imagenet", "size": 224, "views": 256},
    {"preset": "cifar", "size": 32, "views": 256},
]
# The spill pipeline/colour_gpu.py's docstring states for its kernel: with Triton 3.6 ptxas gives it 128
# registers and spills 20 bytes (3.8: 122 registers, none).
COLOUR_MAX_SPILL_BYTES = 20


def colour_cases(configs=None) -> list[CompileCase]:
    """The colour kernel's launch per config, as ``colour_batch`` makes it on a GPU: the real launcher runs on
    CPU tensors (never touched) with the GPU's block size and the launch recorded instead of run."""
    import torch

    from ..pipeline import augment, colour_gpu
    from ..pipeline.colour_spec import colour_params

    captured = []

    class _Recorder:  # stands in for ``_colour_kernel``: ``_colour_kernel[grid](*args, **kwargs)`` is recorded
        def __getitem__(self, grid):
            return lambda *args, **kwargs: captured.append((tuple(grid), args, kwargs))

    kernel, interpret = colour_gpu._colour_kernel, colour_gpu._INTERPRET
    cases = []
    try:
        colour_gpu._colour_kernel, colour_gpu._INTERPRET = _Recorder(), False
        for config in configs or COLOUR_CONFIGS:
            preset = (
                augment.AugmentConfig.cifar
                if config["preset"] == "cifar"
                else augment.AugmentConfig
            )  # as trainer/data.py
            cfg = preset(size=config["size"])
            captured.clear()
            images = torch.empty(
                config["views"], config["size"], config["size"], 3, dtype=torch.uint8
            )
            uniforms = torch.empty(config["views"], len(augment.UNIFORMS), dtype=torch.float32)
            # a torch copy of the table: aligned as the CUDA copy the DALI operator makes (_params_on)
            colour_gpu.colour_batch(images, uniforms, torch.from_numpy(colour_params(cfg)).clone())
            limits: dict[str, Any] = {
                "config": dict(config),
                "max_spill_bytes": COLOUR_MAX_SPILL_BYTES,
            }
            cases += [
                case_from_launch(kernel, *launch[1:], grid=launch[0], **limits)
                for launch in captured
            ]
    finally:
        colour_gpu._colour_kernel, colour_gpu._INTERPRET = kernel, interpret
    return cases


# The table: one entry per kernel family (see the module docstring).
CASE_SOURCES: dict[str, Callable[[], list[CompileCase]]] = {
    "ntxent": ntxent_cases,
    "colour": colour_cases,
}


# --------------------------------------------------------------------------- compile and read


def h100_occupancy(registers: int, shared_bytes: int, num_warps: int) -> dict:
    """CTAs per SM (and why) and the occupancy (resident warps / 64) of a kernel on an H100."""
    h = H100
    round_up = lambda x, unit: -(-x // unit) * unit  # noqa: E731
    registers_per_warp = round_up(max(registers, 1) * 32, h["register_granularity"])
    warps_per_partition = (
        h["registers_per_sm"] // h["register_sub_partitions"] // registers_per_warp
    )
    fits_one = (
        registers <= h["max_registers_per_thread"]
        and registers_per_warp * round_up(num_warps, h["register_sub_partitions"])
        <= h["registers_per_sm"]
    )
    shared_allocated = round_up(
        shared_bytes + h["shared_reserved_per_block"], h["shared_granularity"]
    )
    limits = {
        "registers": warps_per_partition * h["register_sub_partitions"] // num_warps
        if fits_one
        else 0,
        "warps": h["max_warps_per_sm"] // num_warps,
        "ctas": h["max_ctas_per_sm"],
        "shared": h["shared_per_sm"] // shared_allocated
        if shared_bytes <= h["shared_per_block"]
        else 0,
    }
    ctas = min(limits.values())
    return {
        "ctas_per_sm": ctas,
        "occupancy": ctas * num_warps / h["max_warps_per_sm"],
        "limited_by": [name for name, limit in limits.items() if limit == ctas],
    }


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def compile_case(case: CompileCase) -> dict:
    """Compile one case for sm_90a and read its resources; raises what triton.compile raises."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = _resolve(case.kernel)
    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options(dict(case.options))
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in case.aligned}
    source = triton.compiler.ASTSource(
        fn=kernel, signature=case.signature, constexprs=case.constexprs, attrs=attrs
    )
    triton.knobs.nvidia.dump_ptxas_log = (
        True  # Triton's own ptxas -v run prints its log: read it, not a rerun
    )
    triton.knobs.compilation.always_compile = True  # the log exists only when ptxas runs
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=target, options=options.__dict__)
    seconds = time.perf_counter() - start
    ptxas_log = log.getvalue()
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run(
            [str(tools / "nvdisasm"), str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    registers = re.search(r"Used (\d+) registers", ptxas_log)
    if registers is None:
        raise RuntimeError(
            f"no 'Used N registers' in the ptxas log of {case.name}:\n{ptxas_log[-2000:]}"
        )
    largest = lambda pattern: max([int(x) for x in re.findall(pattern, ptxas_log)] or [0])  # noqa: E731
    num_warps = compiled.metadata.num_warps
    report = {
        "registers": int(registers.group(1)),
        "spill_store_bytes": largest(r"(\d+) bytes spill stores"),
        "spill_load_bytes": largest(r"(\d+) bytes spill loads"),
        "stack_frame_bytes": largest(r"(\d+) bytes stack frame"),
        "shared_bytes": compiled.metadata.shared,
        "num_warps": num_warps,
        "num_stages": options.num_stages,
        "wgmma": _count(r"wgmma\.mma_async", compiled.asm["ptx"]),
        "HGMMA": _count(r"\bHGMMA\.", sass),
        "HMMA": _count(r"\bHMMA\.", sass),
        "FFMA": _count(r"\bFFMA\b", sass),
        "MUFU.EX2": _count(r"\bMUFU\.EX2\b", sass),
        "compile_s": round(seconds, 2),
    }
    report.update(h100_occupancy(report["registers"], report["shared_bytes"], num_warps))
    return report


def _jsonable(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return str(value)  # tl.float32 and other constexpr objects


def compile_all(sources=None) -> dict:
    """Every case of ``sources`` (default: all of CASE_SOURCES), each distinct specialisation compiled once,
    in this process (whose Triton is the one reported)."""
    import triton

    rows, compiled, errors = [], {}, {}
    start = time.perf_counter()
    for source_name in sources or CASE_SOURCES:
        for case in CASE_SOURCES[source_name]():
            key = case.key()
            if key not in compiled and key not in errors:
                try:
                    compiled[key] = compile_case(case)
                except Exception as error:  # reported per case: the test names every failing launch
                    errors[key] = f"{type(error).__name__}: {str(error)[-2000:]}"
            row = {
                "source": source_name,
                "kernel": case.name,
                **case.config,
                "grid": list(case.grid),
                "constexprs": {k: _jsonable(v) for k, v in case.constexprs.items()},
                "options": dict(case.options),
                "expect_tensor_cores": case.tensor_cores,
                "expect_exp2": case.exp2,
                "max_spill_bytes": case.max_spill_bytes,
            }
            row.update(compiled.get(key) or {"error": errors[key]})
            rows.append(row)
    return {
        "triton": triton.__version__,
        "triton_path": str(Path(triton.__file__).parent),
        "distinct_compilations": len(compiled) + len(errors),
        "seconds": round(time.perf_counter() - start, 1),
        "cases": rows,
    }


# --------------------------------------------------------------------------- Triton versions


def triton_site(version: str, cache: Path = TRITON_CACHE) -> Path:
    """A directory holding Triton ``version`` alone (``pip download --no-deps`` of its wheel, ``pip install
    --no-deps --target``), cached under ``cache``; put it first on PYTHONPATH to run that Triton. Raises
    ``subprocess.CalledProcessError`` (pip's output in it) when pip fails."""
    site = cache / f"triton-{version}"
    if (site / "triton" / "__init__.py").exists():
        return site
    cache.mkdir(parents=True, exist_ok=True)
    wheels = cache / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run = dict(check=True, capture_output=True, text=True)
    subprocess.run(
        [*pip, "download", f"triton=={version}", "--no-deps", "--only-binary=:all:", "-d", wheels],
        **run,
    )
    wheel = sorted(wheels.glob(f"triton-{version}-*.whl"))[-1]
    partial = Path(tempfile.mkdtemp(prefix=f"triton-{version}-", dir=cache))
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-compile", "--target", partial, wheel], **run
    )
    try:
        partial.rename(site)  # atomic: a concurrent run sees a whole install or none
    except OSError:  # another run installed it first
        subprocess.run(["rm", "-rf", str(partial)], check=False)
    return site


def compile_in_subprocess(site: Path | None = None, sources=None, timeout_s: int = 900) -> dict:
    """compile_all in a fresh interpreter with the Triton of ``site`` (None: this environment's), its
    compile cache a throwaway directory (every case compiles, so ptxas's log is always read)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
    paths = ([str(site)] if site else []) + [str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(
        paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    with tempfile.TemporaryDirectory(prefix="triton-sm90-") as tmp:
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")
        out = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "simclr_dali.bench.triton_sm90", "--child", str(out)]
        command += ["--sources", *(sources or CASE_SOURCES)]
        proc = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- command line


def _summary(report: dict) -> str:
    lines = [
        f"Triton {report['triton']}: {report['distinct_compilations']} compilations in {report['seconds']} s"
    ]
    for row in report["cases"]:
        config = " ".join(
            f"{k}={row[k]}"
            for k in ("dtype", "precision", "d", "rows", "preset", "size", "views")
            if k in row
        )
        if "error" in row:
            lines.append(f"  {row['kernel']:22s} {config}: ERROR {row['error'][:200]}")
            continue
        lines.append(
            f"  {row['kernel']:22s} {config:42s} regs {row['registers']:3d} spill {row['spill_store_bytes']:3d} B "
            f"smem {row['shared_bytes'] / 1024:6.1f} KiB  {row['ctas_per_sm']} CTA/SM occ {row['occupancy']:.0%} "
            f"wgmma {row['wgmma']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from ..common.cli import ArgumentParser

    parser = ArgumentParser(prog="bench.py triton-sm90", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--versions",
        nargs="*",
        default=[GPU_MACHINE_TRITON],
        help="Triton versions beside the pinned",
    )
    parser.add_argument(
        "--sources", nargs="*", default=list(CASE_SOURCES), choices=list(CASE_SOURCES)
    )
    parser.add_argument("--out", default=str(RESULT), help="the JSON report")
    parser.add_argument(
        "--child", metavar="PATH", help=argparse.SUPPRESS
    )  # compile here, write PATH
    args = parser.parse_args(argv)
    if args.child:
        Path(args.child).write_text(json.dumps(compile_all(args.sources)))
        return 0
    from .common import write_result

    reports = [compile_in_subprocess(None, args.sources)]
    reports += [
        compile_in_subprocess(triton_site(version), args.sources) for version in args.versions
    ]
    for report in reports:
        print(_summary(report))
    payload = {
        "device": "none (ahead-of-time compile for sm_90a: GPUTarget('cuda', 90, 32), Triton's bundled ptxas)",
        "target": "NVIDIA H100 (sm_90a)",
        "h100_resources": H100,
        "method": (
            "each launch of a loss step captured from the real launchers (nt_xent forward + backward, launches "
            "recorded instead of run, an H100's 132 SMs for launch_grid), and the colour kernel's launch from "
            "real colour_batch calls (224 and 32 px views, the GPU's BLOCK), specialised as the JIT does, compiled "
            "with triton.compile(ASTSource(...), target=GPUTarget('cuda', 90, 32)); registers and spills from "
            "Triton's own ptxas -v log, shared memory from its metadata, CTAs/SM and occupancy by CUDA's "
            "occupancy rules (cuda_occupancy.h) with the largest shared-memory carve-out, wgmma counted in the "
            "PTX, HGMMA/HMMA/MUFU.EX2 in nvdisasm's SASS"
        ),
        "triton_versions": [report["triton"] for report in reports],
        "reports": reports,
    }
    print(f"wrote {write_result('Triton kernels compiled for Hopper (sm_90a)', payload, args.out)}")
    failed = [row for report in reports for row in report["cases"] if "error" in row]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput and memory benchmarks (``python bench.py NAME`` in the checkout, ``simclr-bench NAME`` installed);
results go to bench/results/<name>_<device>.json (+ plots: ``pip install ".[bench]"`` for matplotlib).

    python bench.py pipeline   # DALI loader vs torchvision DataLoader, two SimCLR views (224 px and 32 px)
    python bench.py loss       # NT-Xent forward+backward: reference, torch.compile, chunked, fused kernel
    python bench.py model      # the model alone on synthetic device-resident input (train's upper bound)
    python bench.py train      # training throughput: synthetic input vs DALI vs torchvision-fed, same model
    python bench.py cifar10    # the CIFAR-10 recipe end to end: accuracy against wall-clock, DALI vs torchvision-fed
    python bench.py writer     # the shard writer: peak memory against data-set size, CIFAR storage formats
    python bench.py profile --config CONFIG [train.py flags]   # where a step's time goes: stage table, trace, verdict
    python bench.py gpu-check [--threads N ...]  # on a GPU: the data path, the kernels against float64, throughput
    python bench.py triton-sm90 # every Triton kernel launch compiled for Hopper (sm_90a), Triton 3.8 and 3.6, no GPU
    python bench.py sigkill-resume  # 30 SIGKILLs at random moments, chained --resume auto, final weights compared
    python bench.py methods probe_step|report   # SupCon, SimCLRv2 head, online probe, distillation (issue 31)

Each prints a summary and records device, versions, command and date beside the numbers.
`python bench.py NAME --help` lists a benchmark's options.
"""

from __future__ import annotations

import sys

from ..common.errors import ExitStatus

COMMANDS = {
    "pipeline": "pipeline",
    "loss": "loss",
    "model": "train:model_main",
    "train": "train",
    "cifar10": "cifar10",
    "writer": "writer",
    "profile": "profile",
    "gpu-check": "gpu_check",
    "triton-sm90": "triton_sm90",
    "sigkill-resume": "sigkill_resume",
    "methods": "methods",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown benchmark {name!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return ExitStatus.BAD_INPUT
    import importlib

    module, _, function = COMMANDS[name].partition(":")
    result = getattr(importlib.import_module(f".{module}", __name__), function or "main")(rest)
    return (
        result if isinstance(result, int) else 0
    )  # a command that returns an exit status (gpu-check) passes it on

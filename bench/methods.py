"""The SimCLR family (issue 31) measured on the CIFAR-10 CPU preset.

    python bench.py methods probe_step [--rounds 6 --steps 2]   # step time with the online probe on vs off
    python bench.py methods report --runs DIR                    # bench/results/methods_cifar10_cpu.json + .png

``probe_step``: the preset's model and batch (configs/cifar10_cpu.yaml) on synthetic device-resident views
(no data loading: the probe's share of the step is largest there), ``train_step`` with and without the probe,
interleaved round by round (off, on, on, off, ...) so that a busy machine slows both alike; per step the
wall time, and separately the probe's own ``update`` (the only work it adds). ``report`` gathers the arms
that bench/methods_cifar10.sh trained and evaluated (same preset, seed and time budget) into one JSON and a
plot, whatever the result."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from .common import RESULTS, write_result

ROOT = Path(__file__).resolve().parents[1]


def _timed_steps(
    model, optimizer, views, labels, cfg, accelerator, probe, steps: int
) -> list[float]:
    from ..trainer.step import train_step

    times = []
    for _ in range(steps):
        started = time.perf_counter()
        train_step(model, optimizer, *views, cfg, accelerator, labels, probe=probe)
        times.append(time.perf_counter() - started)
    return times


def probe_step(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py methods probe_step")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode and round")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the preset's")
    args = parser.parse_args(argv)
    from accelerate import Accelerator

    from ..trainer.build import build_model, prepare_for_training
    from ..trainer.config import load_config
    from ..trainer.online_probe import OnlineProbe
    from ..trainer.optim import build_optimizer

    overrides = {"train_shards": "unused"}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    cfg = load_config(ROOT / "configs" / "cifar10_cpu.yaml", overrides)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu", 1)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = prepare_for_training(accelerator, model, optimizer)
    n = cfg.batch_size
    views = [
        torch.randn(n, 3, cfg.augment.size, cfg.augment.size).to(memory_format=torch.channels_last)
        for _ in "12"
    ]
    labels = torch.randint(0, 10, (n,))
    probe = OnlineProbe(
        accelerator.unwrap_model(model).feature_dim, 10, cfg.online_probe_lr, torch.device("cpu")
    )
    _timed_steps(model, optimizer, views, labels, cfg, accelerator, probe, 1)  # warm-up, both paths
    _timed_steps(model, optimizer, views, labels, cfg, accelerator, None, 1)
    times = {"off": [], "on": []}
    for round_index in range(args.rounds):
        for mode in ("off", "on") if round_index % 2 == 0 else ("on", "off"):
            chosen = probe if mode == "on" else None
            times[mode] += _timed_steps(
                model, optimizer, views, labels, cfg, accelerator, chosen, args.steps
            )
    h = torch.randn(2 * n, accelerator.unwrap_model(model).feature_dim)
    update = []
    for _ in range(50):
        started = time.perf_counter()
        probe.update(h, labels)
        update.append(time.perf_counter() - started)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    result = {
        "config": "configs/cifar10_cpu.yaml",
        "batch_size": n,
        "protocol": f"{args.rounds} interleaved rounds x {args.steps} steps per mode, synthetic views, after warm-up",
        "step_seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "median_step_seconds_off": round(off, 4),
        "median_step_seconds_on": round(on, 4),
        "on_over_off": round(on / off, 4),
        "probe_update_seconds_median": round(statistics.median(update), 6),
        "probe_update_share_of_step": round(statistics.median(update) / off, 5),
    }
    path = write_result("methods_probe_step", result)
    print(json.dumps({k: v for k, v in result.items() if k != "step_seconds"}, indent=1))
    print(f"wrote {path}")
    return 0


def _arm(run_dir: Path, eval_reports: dict[str, Path]) -> dict:
    """One arm: its training summary (train.py's last lines) and its evaluation reports."""
    log = (run_dir.parent / f"{run_dir.name}.log").read_text()
    summary = {"command": log.splitlines()[0].split(": ", 1)[-1]}
    steps = [line for line in log.splitlines() if line.startswith("step ")]
    if steps:
        meters = dict(item.rsplit(" ", 1) for item in steps[-1].split(": ", 1)[1].split(", "))
        summary["last_meters"] = {k: float(v) for k, v in meters.items()}
    done = [line for line in log.splitlines() if line.startswith("done:")]
    summary["done"] = done[-1] if done else None
    summary["evaluations"] = {}
    for name, path in eval_reports.items():
        if path.exists():
            report = json.loads(path.read_text())
            summary["evaluations"][name] = {
                "metrics": report["results"][0]["metrics"],
                "settings": report["settings"],
                "seconds": report.get("seconds"),
            }
    return summary


def report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py methods report")
    parser.add_argument(
        "--runs", required=True, help="the directory bench/methods_cifar10.sh wrote to"
    )
    parser.add_argument("--budget_minutes", type=float, required=True)
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    arms = {}
    for run_dir in sorted(
        p for p in runs.iterdir() if p.is_dir() and (runs / f"{p.name}.log").exists()
    ):
        arms[run_dir.name] = _arm(
            run_dir, {p.stem.split(".", 1)[1]: p for p in runs.glob(f"{run_dir.name}.*.json")}
        )
    probe = RESULTS / "methods_probe_step_cpu.json"
    payload = {
        "data": "CIFAR-10 re-encoded as 32x32 JPEG (../shared/data/cifar10), official train/test split",
        "budget": f"{args.budget_minutes:g} training minutes per arm (max_train_minutes), same preset and seed",
        "note": args.note,
        "arms": arms,
        "probe_step": json.loads(probe.read_text()) if probe.exists() else None,
    }
    path = write_result("methods_cifar10", payload)
    _plot(arms, path.with_suffix(".png"))
    print(f"wrote {path}")
    return 0


def _plot(arms: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rows = []
    for arm, summary in arms.items():
        for evaluation, result in summary["evaluations"].items():
            for metric, value in result["metrics"].items():
                if metric.endswith("top1"):
                    rows.append((f"{arm}\n{evaluation}:{metric.replace('_top1', '')}", value))
        if "online_probe_top1" in summary.get("last_meters", {}):
            rows.append(
                (f"{arm}\nonline probe (train views)", summary["last_meters"]["online_probe_top1"])
            )
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4.5))
    ax.bar(range(len(rows)), [v for _, v in rows])
    ax.set_xticks(range(len(rows)), [label for label, _ in rows], rotation=75, fontsize=7)
    ax.set_ylabel("top-1 (%)")
    ax.set_title("SimCLR family on the CIFAR-10 CPU preset, equal time budget")
    for i, (_, v) in enumerate(rows):
        ax.text(i, v + 0.5, f"{v:.1f}", ha="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
    commands = {"probe_step": probe_step, "report": report}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    return commands[argv[0]](argv[1:])

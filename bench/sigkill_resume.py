"""The SIGKILL resume loop (issue 30): one tiny training run killed with SIGKILL at random moments, again and
again, each time restarted with ``--resume auto``, then finished; its final weights compared bit for bit with an
uninterrupted run's. Records how many kills landed where (before the run started, while a checkpoint was being
staged, at other moments), how each restart went (its exit status and what it resumed from), what was set aside
or swept, and whether the end result is identical.

    python bench.py sigkill-resume [--kills 30] [--seed 0] [--max_steps 400] [--minutes 30]

Kill moments: half uniformly in the first 12 s of a process (import, config, run lock, data checks), half
uniformly in the 8 s after it wrote its first checkpoint (steps with a checkpoint after every one, so many kills
land in a checkpoint write). The uninterrupted reference runs beside the loop. Results are rewritten after every
restart (``complete`` false until the end), and ``--minutes`` bounds the loop. The loop also ends when a process
finishes the run before its kill comes (``ended_by`` says which): each kill after a checkpoint lets a few steps
happen (up to ~30 on an idle 2-core AMD EPYC), so ``--max_steps`` must leave room for the kills asked: 40 steps
ended the loop after 15 and 20 kills, 160 after 23; the default is 400 (the epochs follow from it)."""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from .common import ROOT, write_result

START_WINDOW = (
    12.0  # seconds from the process start: import, config, run lock, data checks (~10 s here)
)
STEPS_PER_EPOCH = 4  # make_shards' 70 images in batches of 16
AFTER_CHECKPOINT_WINDOW = (
    8.0  # seconds after the first checkpoint of a process: steps, a checkpoint after each
)


def tiny_config(**values) -> dict:
    """The tests' tiny training run (configs/smoke/tiny.yaml, shared with tests/conftest.py) with ``values``."""
    return {**yaml.safe_load((ROOT / "configs" / "smoke" / "tiny.yaml").read_text()), **values}


TINY = tiny_config(epochs=40, checkpoint_every=1, keep_checkpoints=2, progress=False)


def make_shards(directory: Path) -> Path:
    import numpy as np

    from ..pipeline.shards.pixel_sources import array_samples
    from ..pipeline.shards.writer import write_shards

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (70, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(70) % 10
    write_shards(
        array_samples(images, labels),
        str(directory / "part-%06d.tar"),
        [f"c{i}" for i in range(10)],
        total=70,
        max_count=30,
        progress=False,
    )
    return directory


def start(config: Path) -> tuple[subprocess.Popen, list[str]]:
    """train.py --resume auto in a child; its output lines collected by a thread as they come."""
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--config", str(config), "--resume", "auto"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True).start()
    return child, lines


def _wait_for(
    lines: list[str], child: subprocess.Popen, texts: tuple[str, ...], after: int = 0
) -> int:
    """Wait until a line (from index ``after``) holds one of ``texts``; its index, or -1 if the child ended."""
    while True:
        for position in range(after, len(lines)):
            if any(text in lines[position] for text in texts):
                return position
        if child.poll() is not None:
            return -1
        time.sleep(0.05)


def kill_at_random(config: Path, out: Path, rng: random.Random) -> dict:
    """One process, killed at a random moment; what the moment was and what the process had said. "after a
    checkpoint" kills come a uniform 0..AFTER_CHECKPOINT_WINDOW s after the process wrote its first checkpoint
    (then it is stepping and writing the next ones), so every such restart has made progress."""
    child, lines = start(config)
    after_checkpoint = rng.random() < 0.5
    if after_checkpoint:
        started = _wait_for(lines, child, (" started with ", " resumed from "))
        _wait_for(lines, child, ("checkpoint ",), max(started, 0) + 1)
    time.sleep(rng.uniform(0, AFTER_CHECKPOINT_WINDOW if after_checkpoint else START_WINDOW))
    staging = (
        [p.name for p in (out / "checkpoints").glob(".tmp-*")]
        if (out / "checkpoints").is_dir()
        else []
    )
    finished = child.poll() is not None
    if not finished:
        child.kill()
    child.wait()
    time.sleep(0.2)  # the output thread's last lines
    resumed = [
        line.split(" resumed from ")[1].split()[0] for line in lines if " resumed from " in line
    ]
    return {
        "window": "after a checkpoint" if after_checkpoint else "from process start",
        "killed": not finished,
        "exit_status": child.returncode,
        "staging_at_kill": bool(staging),
        "resumed_from": resumed[0] if resumed else None,
        "checkpoints_written": sum(line.startswith("checkpoint ") for line in lines),
        "errors": [line.strip() for line in lines if line.startswith("error")],
        "set_aside": sum("set aside as" in line for line in lines),
        "swept": sum("temporary checkpoint(s) a crash left" in line for line in lines),
    }


def run_to_end(config: Path) -> tuple[int, list[str]]:
    child, lines = start(config)
    child.wait()
    time.sleep(0.2)
    return child.returncode, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.py sigkill-resume", description=__doc__)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument(
        "--minutes", type=float, default=30.0, help="stop killing after this long (then finish)"
    )
    parser.add_argument(
        "--json", default=None, help="where the result goes (default bench/results/)"
    )
    args = parser.parse_args(argv)
    if args.max_steps < 1:
        parser.error(f"--max_steps must be >= 1, got {args.max_steps}")
    from safetensors.torch import load_file

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="sigkill-resume-") as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp / "shards")
        configs = {}
        for name in ("reference", "killed"):
            configs[name] = tmp / f"{name}.yaml"
            settings = {
                **TINY,
                "train_shards": str(shards),
                "output_dir": str(tmp / name),
                "max_steps": args.max_steps,
            }
            settings["epochs"] = max(
                TINY["epochs"], -(-args.max_steps // STEPS_PER_EPOCH)
            )  # max_steps is the end
            configs[name].write_text(yaml.safe_dump(settings))
        reference_run, reference_lines = start(configs["reference"])
        restarts, loop_end = [], time.monotonic() + 60 * args.minutes
        while sum(r["killed"] for r in restarts) < args.kills and time.monotonic() < loop_end:
            restarts.append(kill_at_random(configs["killed"], tmp / "killed", rng))
            print(f"restart {len(restarts)}: {restarts[-1]}", flush=True)
            record(args, restarts, None, complete=False)
            if not restarts[-1]["killed"]:
                break  # the run finished before its kill: nothing left to interrupt
        killed = sum(r["killed"] for r in restarts)
        ended_by = (
            "kills reached"
            if killed >= args.kills
            else "minutes"
            if not restarts or restarts[-1]["killed"]
            else "run finished"
        )
        status, lines = run_to_end(configs["killed"])
        assert reference_run.wait() == 0, f"the uninterrupted run failed: {reference_lines[-5:]}"
        reference = load_file(str(tmp / "reference" / "backbone.safetensors"))
        final_weights = (
            load_file(str(tmp / "killed" / "backbone.safetensors")) if status == 0 else {}
        )
        identical = (
            bool(final_weights)
            and final_weights.keys() == reference.keys()
            and all(final_weights[k].equal(reference[k]) for k in reference)
        )
        leftovers = sorted(
            p.name
            for p in (tmp / "killed" / "checkpoints").iterdir()
            if not (p / "manifest.json").is_file() or p.name.startswith(".")
        )
    final = {
        "ended_by": ended_by,  # kills reached, minutes (--minutes), or run finished (a process ended before its kill)
        "final_exit_status": status,
        "final_weights_identical_to_uninterrupted_run": identical,
        "incomplete_or_temporary_left_at_the_end": leftovers,
        "final_run_errors": [line.strip() for line in lines if line.startswith("error")],
    }
    target, payload = record(args, restarts, final, complete=True)
    print(f"{ {k: v for k, v in payload.items() if k != 'restarts'} }\n-> {target}")
    return 0 if status == 0 and identical and not leftovers else 1


def record(args, restarts: list[dict], final: dict | None, complete: bool):
    """Write the counts so far (every restart: an interrupted loop still leaves its counts)."""
    killed = [r for r in restarts if r["killed"]]
    payload = {
        "complete": complete,
        "kills": len(killed),
        "kills_from_process_start": sum(r["window"] == "from process start" for r in killed),
        "kills_after_a_checkpoint": sum(r["window"] == "after a checkpoint" for r in killed),
        "kills_while_a_checkpoint_was_staged": sum(r["staging_at_kill"] for r in killed),
        "restarts_that_resumed_from_a_checkpoint": sum(
            r["resumed_from"] is not None for r in restarts
        ),
        "checkpoints_written_by_killed_processes": sum(r["checkpoints_written"] for r in restarts),
        "restarts_with_an_error_line": sum(bool(r["errors"]) for r in restarts),
        "checkpoints_set_aside_as_unusable": sum(r["set_aside"] for r in restarts),
        "sweeps_of_crash_leftovers": sum(r["swept"] for r in restarts),
        **(final or {}),
        "max_steps": args.max_steps,
        "seed": args.seed,
        "restarts": restarts,
    }
    return write_result("sigkill_resume", payload, args.json), payload

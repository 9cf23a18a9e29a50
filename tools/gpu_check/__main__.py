"""``python -m tools.gpu_check``: what only a GPU can show, in groups that each fit one lent device call.

The lent session's check (bench/GPU_CHECK.md): a developer's tool beside the product, never installed with it;
what a user with a GPU wants (the data path, kernels against float64, throughput) is ``simclr-bench gpu-check``.

    python -m tools.gpu_check --stage_only --out DIR   # a call that brings a bundle part: install it; what is missing
    python -m tools.gpu_check --group data --out DIR   # the call that brings the last part: the data path, first
    python -m tools.gpu_check --group torch --out DIR  # kernels, ResNet-50, the loss, the torch GPU tests
    python -m tools.gpu_check --dry_run [--group G]    # the same on the CPU at tiny sizes (tests run it)
    python -m tools.gpu_check --plan                   # the device-time plan and the caps, checked; runs nothing

The stages are a table (``stages.STAGES``: name, group, cap, what it needs); a stage that cannot run (no CUDA, DALI or
its data missing, out of time) is recorded as skipped with the reason. Exit status 0 when no stage failed.
"""

from __future__ import annotations

import json
import os
import sys

from simclr_dali.common.cli import ArgumentParser

from . import stages as stage_table
from .check import PIECES, finish_check, run_stage, start_check
from .plan import GROUP_BUDGET_S, PlanError, check_plan, plan_table


def parse(argv, stages):
    parser = ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default runs/gpu_check[_dry])")
    parser.add_argument(
        "--dry_run", action="store_true", help="on the CPU at tiny sizes; skips what needs CUDA"
    )
    parser.add_argument(
        "--group", default="data", choices=sorted(GROUP_BUDGET_S), help="which stages to run"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        choices=[s.name for s in stages],
        help="run only these stages (any group)",
    )
    parser.add_argument(
        "--budget_s", type=float, default=None, help="time for the stages (default: the group's)"
    )
    parser.add_argument(
        "--stage_only", action="store_true", help="install the carried pieces, report, run nothing"
    )
    parser.add_argument(
        "--plan", action="store_true", help="print the checked device-time plan; run nothing"
    )
    return parser.parse_args(argv)


def select(args, stages, always) -> list:
    """The stages a call runs: the pieces and environment always; then --only's (with the stages they need: a
    rerun of train_dali regenerates its data first), or the group's."""
    if args.stage_only:
        return [s for s in stages if s.name in always]
    if args.only:
        wanted, names = set(args.only), {s.name for s in stages}
        for stage in reversed(stages):
            if stage.name in wanted:
                wanted |= {n for n in stage.needs if n in names}
        return [s for s in stages if s.name in always or s.name in wanted]
    return [s for s in stages if s.name in always or s.group == args.group]


def main(argv=None) -> int:
    stages = stage_table.STAGES
    args = parse(sys.argv[1:] if argv is None else argv, stages)
    try:
        plan = check_plan(stages, parts=_staged_parts())
    except PlanError as error:
        print(f"gpu check: the stage table does not fit the device time: {error}", file=sys.stderr)
        return 2
    if args.plan:
        print(plan_table(plan))
        return 0
    os.environ.setdefault(
        "TQDM_DISABLE", "1"
    )  # progress bars would bury the summary in the device tool's output tail
    if (
        args.dry_run
    ):  # CPU devices even where a GPU is present (read at CUDA's initialisation, not yet happened)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    selected = select(args, stages, stage_table.ALWAYS)
    # the dry run's CPU is slower than its caps say nothing about the device: its budget is its own caps' sum
    check = start_check(args, args.group, dry_budget=sum(s.dry_cap_s for s in selected))
    check.report["plan"] = plan
    print(
        f"gpu check{' (dry run)' if args.dry_run else ''} group {args.group}: {check.out}, "
        f"budget {check.report['budget_s']:.0f} s; stages: {', '.join(s.name for s in selected)}",
        flush=True,
    )
    for stage in selected:
        result = run_stage(check, stage)
        check.report["stages"][stage.name] = result
        check.save()
        print(
            f"  {stage.name:<14} {result['status']:<8} {result.get('seconds', 0):6.1f} s  {result.get('note', '')}",
            flush=True,
        )
    return finish_check(check)


def _staged_parts() -> int | None:
    """The number of bundle parts of the pieces staged here (their manifest), if any."""
    for manifest in sorted(PIECES.glob("p*/MANIFEST.json")):
        try:
            return len(json.loads(manifest.read_text())["parts"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


if __name__ == "__main__":
    sys.exit(main())

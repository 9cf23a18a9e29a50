"""The GPU check's device-time plan (tools/gpu_check; bench/GPU_CHECK.md): a lent session has 15 device-minutes,
the machine's start included, and each call carries at most 64 MiB. The plan spends them data path first: the
piece-only calls that bring DALI's bundle, then the ``data`` group (DALI graphs, the pipeline's threads sweep, the
DALI training feed) with the last part, then the ``torch`` group (kernels against float64, ResNet-50, the loss);
one rerun is kept in reserve. ``check_plan`` refuses a stage table whose caps exceed a group's budget or whose
calls exceed the session. These numbers are the device-lending tool's, not the product's: nothing here is packaged.
"""

from __future__ import annotations

# The session's device time and what each call costs beside its stages (planned, not yet measured: write the
# real figures here after the first run). The machine start is "a minute or more" (the device README): 2 min.
DEVICE_BUDGET_S = 900
MACHINE_START_S = 120
CALL_OVERHEAD_S = (
    25  # per call: the working tree and the carried piece up, $OUT back, the reply, the next call
)
PIECE_INSTALL_S = (
    15  # a piece-only call: copy and checksum one ~60 MiB part (the last one also unpacks)
)
PLANNED_BUNDLE_PARTS = (
    3  # DALI + codecs + deps + the ImageNet subset, xz-compressed (~185 MB), when none is staged
)
GROUP_BUDGET_S = {
    "data": 230,
    "torch": 230,
    "extra": 480,
}  # "extra": a later session or time left over
PLANNED_GROUPS = (
    "data",
    "torch",
)  # in this order: the data path first  # what the plan spends the session on; "extra" only runs when asked for


class PlanError(ValueError):
    pass


def stage_caps(stages, group: str, dry_run: bool = False) -> list[tuple[str, float]]:
    """(name, cap) of the stages a group runs: its own and those of every group ("*")."""
    return [
        (s.name, s.dry_cap_s if dry_run else s.cap_s) for s in stages if s.group in (group, "*")
    ]


def check_plan(stages, group_budgets=None, parts: int | None = None) -> dict:
    """The device-time plan: every group's caps within its budget, and machine start + the planned groups' calls +
    the piece-only calls + one rerun of the largest stage within the session's device time. Raises PlanError."""
    budgets = group_budgets or GROUP_BUDGET_S
    parts = parts or PLANNED_BUNDLE_PARTS
    problems, groups = [], {}
    for group, budget in budgets.items():
        caps = stage_caps(stages, group)
        total = sum(cap for _, cap in caps)
        groups[group] = {"budget_s": budget, "caps_s": dict(caps), "sum_caps_s": total}
        if total > budget:
            problems.append(
                f"group {group!r}: stage caps add up to {total:.0f} s, over its {budget:.0f} s budget"
            )
    unknown = {s.group for s in stages} - set(budgets) - {"*"}
    if unknown:
        problems.append(f"stages in groups without a budget: {sorted(unknown)}")
    rerun = max((s.cap_s for s in stages if s.group in PLANNED_GROUPS), default=0) + CALL_OVERHEAD_S
    calls = [("machine start", MACHINE_START_S)]
    calls += [
        (f"call {k + 1}: bundle part {k + 1} of {parts}", PIECE_INSTALL_S + CALL_OVERHEAD_S)
        for k in range(parts - 1)
    ]
    calls.append(
        (
            f"call {parts}: last part + group 'data'",
            PIECE_INSTALL_S + budgets["data"] + CALL_OVERHEAD_S,
        )
    )
    calls.append((f"call {parts + 1}: group 'torch'", budgets["torch"] + CALL_OVERHEAD_S))
    calls.append(("one rerun of the largest stage", rerun))
    total = sum(seconds for _, seconds in calls)
    if total > DEVICE_BUDGET_S:
        problems.append(
            f"the plan needs {total:.0f} s of device time, over the session's {DEVICE_BUDGET_S} s"
        )
    plan = {
        "device_budget_s": DEVICE_BUDGET_S,
        "calls": dict(calls),
        "total_s": total,
        "groups": groups,
    }
    if problems:
        raise PlanError("; ".join(problems))
    return plan


def plan_table(plan: dict) -> str:
    lines = [f"{name:<44} {seconds:5.0f} s" for name, seconds in plan["calls"].items()]
    lines.append(
        f"{'total (of ' + str(plan['device_budget_s']) + ' s)':<44} {plan['total_s']:5.0f} s"
    )
    for group, g in plan["groups"].items():
        caps = ", ".join(f"{n} {c:.0f}" for n, c in g["caps_s"].items())
        lines.append(f"group {group}: {g['sum_caps_s']:.0f} of {g['budget_s']:.0f} s ({caps})")
    return "\n".join(lines)

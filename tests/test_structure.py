"""The product's import graph, read from the source with ast (no import runs): no module-level cycle, no
package-level cycle, and the layers (common < model, pipeline.shards < pipeline < evaluation < trainer < bench <
the entry points train/evaluate). Every import counts, also one inside a function or under TYPE_CHECKING: a lazy
import is still a dependency a reader has to follow."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = "simclr_dali"
NOT_PRODUCT = {
    "tests",
    "tools",
    "docker",
    "configs",
    "docs",
    "requirements",
    "runs",
    "data",
    "build",
}
ENTRY_POINTS = {
    "train",
    "evaluate",
}  # simclr-train, simclr-evaluate: nothing of ours may import them

# What each layer may import besides itself (common at the bottom). evaluation never imports trainer: the trainer
# probes with evaluation's code, so the arrow only goes trainer -> evaluation.
ALLOWED = {
    "common": set(),
    "model": {"common"},
    "pipeline.shards": {"common"},
    "pipeline": {"pipeline.shards", "common"},
    "evaluation": {"model", "pipeline", "pipeline.shards", "common"},
    "trainer": {"evaluation", "model", "pipeline", "pipeline.shards", "common"},
    "bench": {"trainer", "evaluation", "model", "pipeline", "pipeline.shards", "common"},
    "train": {"trainer", "evaluation", "model", "pipeline", "pipeline.shards", "common"},
    "evaluate": {"evaluation", "model", "pipeline", "pipeline.shards", "common"},
    "": set(),  # the package's own __init__.py
}
# Known violations owned by someone else: (importer layer, imported layer) -> "owner: why". Empty today; an entry
# here names the work still to do instead of skipping the rule.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


def product_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every product module's dotted name (simclr_dali.x.y) -> its file: the checkout's root is the package."""
    modules = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if (
            rel.parts[0] in NOT_PRODUCT
            or rel.parts[0].startswith(".")
            or rel.parts[0].endswith(".egg-info")
        ):
            continue
        if rel == Path(
            "bench.py"
        ):  # the checkout's shim over bench/, not installed (pyproject py-modules)
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([PACKAGE, *parts])] = path
    return modules


def imported_names(module: str, path: Path) -> list[str]:
    """Absolute dotted names of what ``path`` imports, relative imports resolved against ``module``'s package;
    for ``from X import a`` both X.a (a submodule) and X are candidates, the first that is a module wins."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.append([f"{target}.{alias.name}" for alias in node.names] + [target])
        elif isinstance(node, ast.Import):
            names += [[alias.name] for alias in node.names]
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = defaultdict(set)
    for module, path in modules.items():
        for candidates in imported_names(module, path):
            for target in candidates:
                if target in modules and target != module:
                    graph[module].add(target)
                    break
    return {m: graph.get(m, set()) for m in modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted: the import cycles."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer(module: str) -> str:
    """simclr_dali.pipeline.shards.cli -> pipeline.shards; simclr_dali.trainer.step -> trainer; the root -> ''."""
    parts = module.split(".")[1:]
    if parts[:2] == ["pipeline", "shards"]:
        return "pipeline.shards"
    return parts[0] if parts else ""


@pytest.fixture(scope="module")
def graph():
    return import_graph(product_modules())


def test_the_graph_is_read_from_the_source(graph):
    """The reader resolves relative imports (a reader that found nothing would pass every rule below)."""
    assert len(graph) > 50
    assert "simclr_dali.model.global_bn" in graph["simclr_dali.trainer.build"]
    assert "simclr_dali.pipeline.shards.shardset" in graph["simclr_dali.pipeline.loader"]
    assert "simclr_dali.bench" in graph["simclr_dali.bench.__main__"]  # from . import main
    assert not any(
        m.startswith(f"{PACKAGE}.tests") or m.startswith(f"{PACKAGE}.tools") for m in graph
    )


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycle(graph):
    assert cycles(graph) == []


def test_no_package_level_import_cycle(graph):
    packages = defaultdict(set)
    for module, targets in graph.items():
        packages[layer(module)] |= {layer(t) for t in targets} - {layer(module)}
    assert cycles(dict(packages)) == []


def test_every_import_follows_the_layers(graph):
    violations = defaultdict(list)
    for module, targets in graph.items():
        for target in targets:
            here, there = layer(module), layer(target)
            if (
                here != there
                and there not in ALLOWED[here]
                and (here, there) not in KNOWN_VIOLATIONS
            ):
                violations[(here, there)].append(f"{module} -> {target}")
    assert not violations, dict(violations)
    assert set(ALLOWED) >= {layer(m) for m in graph}, (
        "a new top-level package needs its row in ALLOWED"
    )


def test_nothing_imports_the_entry_points(graph):
    importers = [
        m
        for m, targets in graph.items()
        for t in targets
        if t in {f"{PACKAGE}.{e}" for e in ENTRY_POINTS}
    ]
    assert importers == []


def test_model_imports_nothing_of_ours_but_common(graph):
    outside = {
        t
        for m, ts in graph.items()
        if layer(m) == "model"
        for t in ts
        if layer(t) not in ("model", "common")
    }
    assert outside == set()


def test_the_type_check_counts_unresolved_imports_apart():
    """tools/typecheck.py (make lint): an import mypy cannot find, or a name of ours a module lacks, fails the lint
    whatever the baseline; a third-party attribute error is only counted."""
    from tools.typecheck import ERROR, unresolved

    lines = [
        'simclr_dali/train.py:3: error: Cannot find implementation or library stub for module named "x"  '
        "[import-not-found]",
        'simclr_dali/evaluate.py:9: error: Module "simclr_dali.trainer.optim" has no attribute "sgd_cosine"  '
        "[attr-defined]",
        'simclr_dali/pipeline/augment.py:5: error: Module has no attribute "RGB"  [attr-defined]',
        "simclr_dali/model/simclr.py:7: error: Incompatible return value type  [return-value]",
    ]
    errors = [m.groupdict() for m in map(ERROR.match, lines) if m]
    assert [e["code"] for e in errors] == [
        "import-not-found",
        "attr-defined",
        "attr-defined",
        "return-value",
    ]
    assert [e["line"] for e in unresolved(errors)] == ["3", "9"]


def test_the_product_never_imports_the_tools():
    """tools/ is not packaged: an import of it from the product would fail in every installed copy."""
    modules = product_modules()
    importers = [
        m
        for m, path in modules.items()
        for candidates in imported_names(m, path)
        if any(c == "tools" or c.startswith(("tools.", f"{PACKAGE}.tools")) for c in candidates)
    ]
    assert importers == []

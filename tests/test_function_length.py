"""No function of the product code is longer than 100 lines (Triton kernels excepted: a kernel is one fused
loop body the compiler sees whole). The AST of every .py file of the package (the checkout's root, tests and
virtual environments excluded) is read, so a new long function fails here, naming its file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 100
NOT_PRODUCT = {"tests", "build", "dist", "docs", "tools"}


def product_files() -> list[Path]:
    return sorted(
        path
        for path in ROOT.rglob("*.py")
        if not any(
            part in NOT_PRODUCT or part.startswith(".")
            for part in path.relative_to(ROOT).parts[:-1]
        )
    )


def is_kernel(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(
        ast.unparse(decorator).split("(")[0] in ("triton.jit", "jit")
        for decorator in function.decorator_list
    )


def long_functions(source: str, limit: int = LIMIT) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function or method over ``limit`` lines, kernels excepted."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not is_kernel(node):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append((node.name, node.lineno, length))
    return found


def test_the_check_finds_a_long_function_and_spares_a_kernel():
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    assert long_functions(f"def long():\n{body}\n") == [("long", 1, LIMIT + 1)]
    assert long_functions(
        f"class A:\n    def method(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n"
    )
    assert long_functions(f"@triton.jit\ndef kernel():\n{body}\n") == []
    assert long_functions(f"def short():\n{body}\n", limit=LIMIT + 1) == []


def test_product_files_are_found():
    names = {path.relative_to(ROOT).as_posix() for path in product_files()}
    assert {"train.py", "evaluate.py", "trainer/session.py", "model/ntxent_triton.py"} <= names
    assert not any(name.startswith("tests/") for name in names)


@pytest.mark.parametrize(
    "path", product_files(), ids=lambda path: path.relative_to(ROOT).as_posix()
)
def test_no_product_function_is_over_100_lines(path):
    found = long_functions(path.read_text())
    assert not found, ", ".join(
        f"{path.relative_to(ROOT)}:{line} {name} is {n} lines (> {LIMIT})"
        for name, line, n in found
    )


def test_the_training_loop_fits_one_screen():
    """train.py's loop (``train``) stays readable in one screen: its components decide when they are due."""
    loops = [
        node
        for node in ast.parse((ROOT / "train.py").read_text()).body
        if getattr(node, "name", "") == "train"
    ]
    assert len(loops) == 1 and loops[0].end_lineno - loops[0].lineno + 1 <= 60

"""Every make target, repository path, command-line flag, Docker build argument and link that README.md and the
pages in docs/ name exists.

Read from each page's code, fenced blocks and `inline` spans (prose outside them is not parsed), paths in code
relative to the repository's root on every page:
- ``make [-n|-C DIR|-o FILE] [VAR=value ...] [TARGET ...]``: each TARGET is a Makefile target, each VAR a
  variable the Makefile sets or reads;
- paths: one whose first part is a top-level entry of the repository (``pipeline/...``, ``configs/x.yaml``,
  ``Makefile``) must exist (glob patterns must match); one starting with ``../`` lies outside a user's clone;
  run outputs and placeholders (``runs/``, ``data/``, absolute paths, ``OUTPUT_DIR/...``, brace or ``%``
  patterns) are not checked; a bare ``*.py``/``*.sh`` name must be a file somewhere in the repository, and
  in the Layout block one in the folder its line describes; ``simclr_dali.x.y`` must be a module (or a name
  defined in one);
- flags: a ``--flag`` given to one of the project's commands (train.py, evaluate.py, bench.py, ``simclr-*``,
  ``python -m simclr_dali...``, the image's ``train``/``evaluate``/``shards``/``bench``) is one of the
  project's flags: a ``--...`` string in its non-test sources (every ``add_argument``), a field of a
  ``*Config`` dataclass, or jsonargparse's ``--config``/``--print_config``; ``accelerate launch``'s flags
  (also those before ``--`` in the image's ``train``) are checked against Accelerate's own parser; a flag
  outside any command must be one of these, or of the tools named in EXTERNAL_FLAGS; flags given to other
  tools (docker, sbatch, pip, ...) are not checked, except
- ``--build-arg NAME=...``: NAME is an ``ARG`` of docker/Dockerfile;
- links ``[text](target)`` (prose included): a relative target, resolved from the page's folder, is a file of
  the repository (``PENDING_PAGES`` excepted while absent), and its ``#anchor`` (or a bare ``#anchor``) a heading
  of that page, as GitHub spells heading anchors.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT

# Flags of other tools that the README may name in prose, outside a command line of that tool.
EXTERNAL_FLAGS = {
    # docker
    "--rm", "--gpus", "--ipc", "--shm-size", "--network", "--secret", "--build-arg", "--mount", "--progress",
    # sbatch / srun
    "--nodes", "--requeue", "--signal", "--gpus-per-node", "--cpus-per-task", "--ntasks-per-node", "--time",
    "--container-image", "--container-mounts",
    # pip / pytest / make
    "--no-deps", "--no-build-isolation", "--editable", "--help",
}  # fmt: skip
EXTERNAL_COMMANDS = {
    "docker", "sbatch", "srun", "pip", "pip3", "pytest", "git", "curl", "wget", "tar", "ssh", "nvidia-smi",
    "apt-get", "hadolint", "shellcheck", "tensorboard", "wandb", "bash", "sh", "export", "ls", "du", "cp",
}  # fmt: skip
# Files of other projects that the README cites by name.
EXTERNAL_FILES = {"eval_knn.py"}  # DINO's kNN evaluation
OUTPUT_PREFIXES = (
    "runs/",
    "data/",
    "/",
    "~",
    "$",
    "OUTPUT_DIR",
    "EXPORT",
    "RUN/",
    "DIR/",
    "OUT/",
    "http",
    "file:",
)
PROJECT_COMMAND = re.compile(
    r"(^|/)(train|evaluate|bench)\.py$|^simclr-(train|evaluate|shards|bench|export)$"
)
IMAGE_COMMANDS = {"train", "evaluate", "shards", "bench", "demo"}
SHELL_SEPARATORS = re.compile(r"\s(?:&&|\|\||;|\|)\s")
# Docs pages and make targets that other branches of issues 28-32 add, which the README links or names already:
# skipped only while they do not exist (once merged they are checked like any other page and target).
PENDING_PAGES = {
    "docs/configuration.md": "i32-core", "docs/development.md": "i32-tools", "docs/gpu.md": "i29-gpu",
    "docs/methods.md": "i31-family", "docs/object_storage.md": "i28-s3", "docs/reliability.md": "i30-faults",
}  # fmt: skip
PENDING_TARGETS = {"test-slow": "i32-tools"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass
class Known:
    """What exists: Makefile targets and variables, Dockerfile ARGs, the project's and Accelerate's flags."""

    root: Path
    targets: set[str] = field(default_factory=set)
    variables: set[str] = field(default_factory=set)
    build_args: set[str] = field(default_factory=set)
    project_flags: set[str] = field(default_factory=set)
    accelerate_flags: set[str] = field(default_factory=set)
    files: list[str] = field(default_factory=list)
    top_level: set[str] = field(default_factory=set)


def flag_key(flag: str) -> str:
    return flag.split("=", 1)[0].replace("-", "_")


def repository_files(root: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-co", "--exclude-standard"],
        capture_output=True,
        text=True,
    ).stdout.split()
    return [name for name in listed if (root / name).exists()] or [
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".git" not in p.parts
    ]


def known_names(root: Path) -> Known:
    known = Known(root)
    known.files = repository_files(root)
    known.top_level = {name.split("/")[0] for name in known.files}
    makefile = (root / "Makefile").read_text()
    for line in makefile.splitlines():
        if line.startswith(("\t", "#")) or ":" not in line:
            continue
        head, _, rest = line.partition(":")
        if rest.startswith("=") or "=" in head:
            continue
        known.targets.update(name for name in head.split() if not name.startswith("."))
        if head.strip() == ".PHONY":
            known.targets.update(rest.split())
    known.variables = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?:\?|:|\+)?=", makefile, re.M))
    known.variables |= set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", makefile))
    known.build_args = set(
        re.findall(
            r"^\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)",
            (root / "docker" / "Dockerfile").read_text(),
            re.M,
        )
    )
    flags = {"--config", "--print_config", "--help", "-h"}
    for name in known.files:
        if not name.endswith(".py") or name.startswith("tests/"):
            continue
        try:
            tree = ast.parse((root / name).read_text())
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"--[A-Za-z][\w-]*", node.value)
            ):
                flags.add(node.value)
            if (
                isinstance(node, ast.ClassDef)
                and node.name.endswith("Config")
                and _is_dataclass(node)
            ):
                flags |= {
                    f"--{item.target.id}"
                    for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                }
    from simclr_dali.trainer.config import ALIASED  # earlier versions' flat flags, still accepted

    flags |= {f"--{name}" for name in ALIASED}
    known.project_flags = {flag_key(f) for f in flags}
    from accelerate.commands.launch import launch_command_parser

    known.accelerate_flags = {
        flag_key(s) for action in launch_command_parser()._actions for s in action.option_strings
    }
    return known


def _is_dataclass(node: ast.ClassDef) -> bool:
    def name(decorator) -> str:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")

    return any(name(d) == "dataclass" for d in node.decorator_list)


@dataclass
class Segment:
    line: int
    text: str
    layout: bool = False


def segments(readme: str) -> list[Segment]:
    """The README's code: each fenced block's lines (continuations joined; a trailing shell comment is a segment
    of its own) and each inline span, with its line number."""
    found, lines, fence, section = [], readme.splitlines(), None, ""
    number = 0
    while number < len(lines):
        line = lines[number]
        if line.startswith("#") and fence is None:
            section = line.lstrip("#").strip()
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            number += 1
            continue
        if fence is not None:
            start = number
            while line.endswith("\\") and number + 1 < len(lines):
                number += 1
                line = line[:-1] + " " + lines[number].strip()
            code, hash_, comment = (
                line.partition(" #") if not line.lstrip().startswith("#") else ("", "#", line)
            )
            found.append(Segment(start + 1, code, layout=section == "Layout"))
            if hash_:
                found.append(Segment(start + 1, comment))
        else:
            found += [Segment(number + 1, span) for span in re.findall(r"`([^`]+)`", line)]
        number += 1
    return found


def _clean(token: str) -> str:
    return token.strip("\"'`,;:()[]<>").removesuffix(".")


def check(readme: str, known: Known, page: str = "README.md") -> list[str]:
    """Problems in one page (``page``: its path in the repository, which its links are relative to)."""
    problems, layout_dir = _check_links(readme, known, page), ""
    for segment in segments(readme):
        where = f"{page}:{segment.line}"
        if segment.layout and not segment.text.startswith(
            " "
        ):  # an unindented Layout line starts a new entry
            layout_dir = ""
        for command in SHELL_SEPARATORS.split(f" {segment.text} "):
            found, layout_dir = _check_command(command.split(), known, segment.layout, layout_dir)
            problems += [f"{where}: {p}" for p in found]
    return problems


def _check_command(
    tokens: list[str], known: Known, layout: bool, layout_dir: str
) -> tuple[list[str], str]:
    """Problems in one shell command (or inline span); ``layout_dir``: the Layout folder the line continues."""
    problems, owner, before_dashes, previous = [], None, False, ""
    for index, raw in enumerate(tokens):
        token = _clean(raw)
        # --- who the following flags belong to
        if PROJECT_COMMAND.search(token) or (previous == "-m" and token.startswith("simclr_dali")):
            owner, before_dashes = "project", False
        elif token == "launch" and previous == "accelerate" and owner is None:
            owner = "accelerate"
        elif owner == "docker-run" and re.fullmatch(r"simclr(:[\w.-]+)?", token):
            following = _clean(tokens[index + 1]) if index + 1 < len(tokens) else ""
            owner = "project" if following in IMAGE_COMMANDS else "external"
            before_dashes = following == "train" and "--" in tokens[index + 1 :]
        elif token in EXTERNAL_COMMANDS and owner is None:
            owner = "docker-run" if token == "docker" else "external"
        elif token == "--" and owner == "project":
            before_dashes = False
        # --- make
        if token == "make" and raw == token:
            problems += _check_make(tokens[index + 1 :], known)
        # --- flags
        if re.fullmatch(r"--[A-Za-z][\w-]*(=.*)?", token):
            key = flag_key(token)
            if token.startswith("--build-arg") or previous == "--build-arg":
                pass
            elif owner == "project" and before_dashes:
                if key not in known.accelerate_flags:
                    problems.append(f"`{token}` is not an accelerate launch flag")
            elif owner == "project":
                if key not in known.project_flags:
                    problems.append(f"`{token}` is not a flag of the project's commands")
            elif owner == "accelerate":
                if key not in known.accelerate_flags:
                    problems.append(f"`{token}` is not an accelerate launch flag")
            elif owner is None and key not in known.project_flags | known.accelerate_flags | {
                flag_key(f) for f in EXTERNAL_FLAGS
            }:
                problems.append(
                    f"`{token}` is a flag of neither the project, accelerate nor a tool it names"
                )
        if previous == "--build-arg" or token.startswith("--build-arg="):
            name = token.removeprefix("--build-arg=").split("=", 1)[0]
            if name not in known.build_args:
                problems.append(f"`--build-arg {name}`: docker/Dockerfile has no ARG {name}")
        # --- paths and modules
        if layout and token.endswith("/") and token.rstrip("/").split("/")[0] in known.top_level:
            layout_dir = token
        problems += _check_path(token, known, layout_dir if layout else None)
        previous = token
    return problems, layout_dir


def _prose_lines(page: str) -> list[tuple[int, str]]:
    """The page's lines outside fenced blocks, numbered from 1."""
    found, fence = [], False
    for number, line in enumerate(page.splitlines(), 1):
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            found.append((number, line))
    return found


def anchors(page: str) -> set[str]:
    """The heading anchors GitHub gives a Markdown page: lower case, punctuation dropped, spaces as hyphens, and
    ``-1``, ``-2``, ... after a repeated one."""
    counts: dict[str, int] = {}
    found = set()
    for _, line in _prose_lines(page):
        if re.match(r"#{1,6} ", line):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            found.add(f"{slug}-{counts[slug]}" if slug in counts else slug)
            counts[slug] = counts.get(slug, 0) + 1
    return found


def _check_links(text: str, known: Known, page: str) -> list[str]:
    problems = []
    for number, line in _prose_lines(text):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = Path(os.path.normpath(Path(page).parent / path)).as_posix() if path else page
            where = f"{page}:{number}: link `{target}`"
            if resolved.startswith("../"):
                problems.append(f"{where} leads outside the repository")
            elif not path:
                if anchor not in anchors(text):
                    problems.append(f"{where}: the page has no heading #{anchor}")
            elif not (known.root / resolved).exists():
                if resolved not in PENDING_PAGES:
                    problems.append(f"{where}: no {resolved} in the repository")
            elif anchor and resolved.endswith(".md"):
                if anchor not in anchors((known.root / resolved).read_text()):
                    problems.append(f"{where}: {resolved} has no heading #{anchor}")
    return problems


def _check_make(tokens: list[str], known: Known) -> list[str]:
    problems, skip = [], False
    for raw in tokens:
        token = _clean(raw)
        if skip:
            skip = False
            continue
        if token in ("-C", "-o", "-f"):
            skip = True
        elif token.startswith("-") or not token:
            continue
        elif "=" in token:
            if token.split("=", 1)[0] not in known.variables:
                problems.append(
                    f"`make {token}`: the Makefile has no variable {token.split('=', 1)[0]}"
                )
        elif re.fullmatch(r"[a-z][\w.-]*", token) and raw == token:
            if token not in known.targets and token not in PENDING_TARGETS:
                problems.append(f"`make {token}`: the Makefile has no target {token}")
        else:
            break
    return problems


def _check_path(token: str, known: Known, layout_dir: str | None) -> list[str]:
    token = (
        token.removeprefix("./").split("=", 1)[-1]
        if "=" in token and "/" in token.split("=", 1)[-1]
        else token
    )
    token = token.removeprefix("./")
    if token.startswith("../"):
        return [
            f"`{token}` is outside the repository (a user's clone has no {token.split('/')[1]}/ beside it)"
        ]
    if re.fullmatch(r"simclr_dali(\.\w+)+", token):
        return _check_module(token, known)
    if not token or token.startswith(OUTPUT_PREFIXES) or re.search(r"[{}%<>$]|NNN|\.\.\.", token):
        return []
    first = token.split("/")[0]
    if "/" in token and first in known.top_level or token in known.top_level:
        if re.search(r"[*?\[]", token):
            return (
                []
                if list(known.root.glob(token.rstrip("/")))
                else [f"`{token}` matches no file in the repository"]
            )
        return (
            [] if (known.root / token).exists() else [f"`{token}` does not exist in the repository"]
        )
    if "/" not in token and re.fullmatch(r"[\w.-]+\.(py|sh|sbatch|toml)", token):
        if layout_dir is not None:
            where = f"{layout_dir}{token}" if layout_dir else token
            return (
                []
                if (known.root / where).is_file()
                else [f"`{token}` (Layout, {layout_dir or 'top level'}): no {where}"]
            )
        if token not in EXTERNAL_FILES and not any(
            Path(name).name == token for name in known.files
        ):
            return [f"`{token}` is no file of the repository"]
    return []


def _check_module(dotted: str, known: Known) -> list[str]:
    parts = dotted.split(".")[1:]
    for cut in (len(parts), len(parts) - 1):
        base = known.root.joinpath(*parts[:cut]) if cut else known.root
        module = next(
            (p for p in (base.with_suffix(".py"), base / "__init__.py") if cut and p.is_file()),
            None,
        )
        if cut == 0:
            module = known.root / "__init__.py"
        if module is None:
            continue
        if cut == len(parts):
            return []
        if re.search(rf"^(def|class) {parts[-1]}\b|^{parts[-1]}\s*[:=]", module.read_text(), re.M):
            return []
    return [f"`{dotted}` is no module (or name in one) of the simclr_dali namespace"]


PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


@pytest.fixture(scope="module")
def known() -> Known:
    return known_names(ROOT)


@pytest.mark.parametrize("page", PAGES)
def test_readme_and_docs_name_only_what_exists(page, known):
    problems = check((ROOT / page).read_text(), known, page)
    assert not problems, f"{page} names what does not exist:\n" + "\n".join(problems)


def test_the_readme_links_every_docs_page():
    """Every page in docs/ is reachable from the README, so none is forgotten (and so each is checked above)."""
    linked = {target.partition("#")[0] for _, line in _prose_lines((ROOT / "README.md").read_text())
              for target in LINK.findall(line)}  # fmt: skip
    assert len(PAGES) > 5 and not set(PAGES[1:]) - linked, set(PAGES[1:]) - linked


def test_the_checker_finds_each_kind_of_false_name():
    """The checker on a README with one false name of each kind (and the same names, true, beside them)."""
    readme = """# T

## Two commands
```bash
make demo   # fine
make nosuchtarget
make NOSUCHVAR=1 test
python train.py --config configs/demo.yaml --nosuch_train_flag 3
simclr-shards write synthetic OUT/x-%06d.tar --per_class 3
accelerate launch --num_processes 2 --nosuch_launch_flag train.py --max_steps 3
docker build --build-arg BASE_IMAGE=x --build-arg NOSUCH_ARG=y -f docker/Dockerfile -t simclr .
docker run --rm simclr train --config_file configs/accelerate/1x8.yaml -- --config configs/nosuch.yaml
```
Prose with `pipeline/nosuch.py`, `../shared/design.md`, `runs/demo/backbone.json`, `nosuch_module.py`,
`simclr_dali.trainer.export.load_exported`, `simclr_dali.trainer.nosuch`, `--precision bf16`, `--nosuch_prose`.

## Layout
```
pipeline/    loader.py, nosuch_layout.py
train.py  evaluate.py      entry points     docker/  test.sh
```
"""
    problems = "\n".join(check(readme, known_names(ROOT)))
    for false in (
        "no target nosuchtarget",
        "no variable NOSUCHVAR",
        "`--nosuch_train_flag` is not a flag",
        "`--nosuch_launch_flag` is not an accelerate",
        "no ARG NOSUCH_ARG",
        "`configs/nosuch.yaml` does not exist",
        "`pipeline/nosuch.py` does not exist",
        "`../shared/design.md` is outside",
        "`nosuch_module.py` is no file",
        "`simclr_dali.trainer.nosuch` is no module",
        "`--nosuch_prose` is a flag of neither",
        "`nosuch_layout.py` (Layout, pipeline/)",
    ):
        assert false in problems, (false, problems)
    for true in ("demo", "--per_class", "--num_processes", "BASE_IMAGE", "1x8.yaml", "backbone.json", "load_exported",
                 "--precision", "loader.py", "test.sh", "`train.py`", "--max_steps", "--config_file"):  # fmt: skip
        assert f"`{true}" not in problems and f" {true}:" not in problems, (true, problems)
    assert len(problems.splitlines()) == 12, problems


def test_the_checker_finds_each_kind_of_false_name_in_a_docs_page(known):
    """A page in docs/: its links resolve from docs/ (anchors included), its code's paths from the root."""
    page = """# Page

## A heading
True: [the README](../README.md#two-commands), [here](#a-heading), [a plot](../bench/results/cifar10_cpu.png),
[a page another branch adds](gpu.md), [web](https://example.com/nosuch.md), [this page](#page).
False: [nosuch](nosuch.md), [no anchor](../README.md#nosuch-heading), [self](#nosuch-here), [out](../../x.md),
[a root-relative link](bench/results/cifar10_cpu.png).
```bash
make nosuchtarget2
make test-slow
python evaluate.py --nosuch_eval_flag 1 --compare_random_init true
```
`pipeline/nosuch2.py`, `simclr_dali.model.nosuch`, `configs/demo.yaml`, `simclr_dali.model.simclr.SimCLR`.

## Layout
```
model/       simclr.py, nosuch_model_layout.py
```
"""
    problems = "\n".join(check(page, known, "docs/x.md"))
    for false in (
        "docs/x.md:6: link `nosuch.md`: no docs/nosuch.md",
        "link `../README.md#nosuch-heading`: README.md has no heading #nosuch-heading",
        "link `#nosuch-here`: the page has no heading #nosuch-here",
        "link `../../x.md` leads outside",
        "link `bench/results/cifar10_cpu.png`: no docs/bench/results/cifar10_cpu.png",
        "no target nosuchtarget2",
        "`--nosuch_eval_flag` is not a flag",
        "`pipeline/nosuch2.py` does not exist",
        "`simclr_dali.model.nosuch` is no module",
        "`nosuch_model_layout.py` (Layout, model/)",
    ):
        assert false in problems, (false, problems)
    assert len(problems.splitlines()) == 10, problems

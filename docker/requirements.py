"""Print the project's runtime requirements from pyproject.toml, one per line: ``dependencies`` plus the
named extras (e.g. the DALI build ``cuda13``). The image installs exactly these, so pyproject.toml stays
the only dependency list.

    python docker/requirements.py pyproject.toml cuda13 > requirements.txt
"""

from __future__ import annotations

import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as file:
        project = tomllib.load(file)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"unknown extra {', '.join(unknown)} (pyproject.toml has: {', '.join(optional)})")
    return list(project["dependencies"]) + [req for extra in extras for req in optional[extra]]


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))

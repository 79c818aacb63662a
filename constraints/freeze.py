"""Write constraints/test.txt: the exact versions, in the current environment, of everything `pip install -e
".[test]"` needs (vqpipe's dependencies and the test extra, followed transitively), so CI installs the set the
tests last passed with. Run it in the venv the tests pass in:

    python constraints/freeze.py > constraints/test.txt
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# CI installs torch first, from the CPU wheel (.ci/run); pin its public version so the local "+cpu" matches.
STRIP_LOCAL = {"torch"}


def project_requirements(extra: str) -> list[str]:
    """The dependencies and `extra` of this checkout's pyproject.toml (not of an installed vqpipe)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())[
        "project"
    ]
    return [*project["dependencies"], *project["optional-dependencies"][extra]]


def closure(requirements: list[str]) -> dict[str, str]:
    """name -> installed version of every distribution `requirements` need, transitively."""
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = []
    seen: set[tuple[str, frozenset[str]]] = set()
    for line in requirements:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate():
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        dist = metadata.distribution(name)
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            try:
                metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                continue  # not needed on this platform / Python
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return found


def main() -> None:
    pins = closure(project_requirements("test"))
    print("# Versions the test suite passed with (python constraints/freeze.py > constraints/test.txt).")
    print('# Used by .ci/run: pip install -e ".[test]" -c constraints/test.txt')
    for name in sorted(pins):
        version = pins[name]
        if name in STRIP_LOCAL:
            version = re.sub(r"\+.*", "", version)
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()

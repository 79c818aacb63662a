"""docs/architecture.md names every module and subpackage of vqpipe, so the page stays true to the code."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_has_its_sentence():
    page = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "vqpipe"
    names = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
    names += [f"{p.name}/" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    missing = sorted(n for n in names if f"`{n}`" not in page)
    assert not missing, f"docs/architecture.md has no row for {missing}"


def test_no_row_names_a_module_that_is_gone():
    page = (ROOT / "docs" / "architecture.md").read_text()
    rows = [line.split("|")[1] for line in page.splitlines() if line.startswith("| `")]
    named = [part.strip().strip("`") for row in rows for part in row.split(",")]
    gone = [
        n
        for n in named
        if n.endswith((".py", "/")) and not (ROOT / "vqpipe" / n).exists() and not (ROOT / n).exists()
    ]
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"

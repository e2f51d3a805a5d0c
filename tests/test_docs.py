"""The project's documents stay true to the repository: links resolve inside it, and the
architecture document names every module of the packages it describes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ARCHITECTURE = ROOT / "docs" / "architecture.md"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc: Path) -> None:
    bad = []
    for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", doc.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path = (doc.parent / target).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            bad.append(target)
    assert not bad, f"{doc.name} links outside the repository or to missing files: {bad}"


def test_architecture_names_every_module() -> None:
    text = ARCHITECTURE.read_text()
    missing = [str(path.relative_to(ROOT))
               for package in ("client", "coordinator", "cluster", "node")
               for path in sorted((ROOT / package).glob("*.py"))
               if path.name != "__init__.py" and f"{package}/{path.stem}" not in text
               and path.stem not in re.findall(r"[\w/]*?(\w+)\.py", text)]
    assert not missing, f"docs/architecture.md does not mention {missing}"

"""docs/promises.md names only tests that exist: a renamed or deleted test fails here, not silently in the map."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMISES = ROOT / "docs" / "promises.md"
# `unit/test_x.py::test_name` or `unit/test_x.py` (a whole file), and `::test_name` (same file as the last one)
REFERENCE = re.compile(r"`((?:[\w/]+/)?test_\w+\.py)?(?:::(\w+))?`")


def referenced_tests() -> list[tuple[str, str | None]]:
    references, current = [], None
    for file, name in REFERENCE.findall(PROMISES.read_text()):
        current = file or current
        if file or name:
            references.append((current, name or None))
    return references


def test_every_test_the_promise_map_names_exists():
    references = referenced_tests()
    assert len(references) > 50  # the parser found the map's rows
    missing = []
    for file, name in references:
        path = ROOT / "tests" / file
        if not path.is_file():
            missing.append(file)
        elif name and not re.search(rf"^\s*def {name}\(", path.read_text(), re.MULTILINE):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/promises.md names tests that do not exist: {missing}"

"""The one writer of the marked, script-owned sections of the pages in ``docs/``.

A benchmark owns the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` of a page
and rewrites only that, so the hand-written prose around it survives every run.
"""

from __future__ import annotations

from pathlib import Path

PERFORMANCE = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def replace_section(name: str, text: str, page: Path = PERFORMANCE) -> None:
    """Put ``text`` between the ``name`` markers of ``page`` (both markers must exist)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = page.read_text()
    start, stop = doc.index(begin) + len(begin), doc.index(end)
    page.write_text(doc[:start] + "\n" + text + "\n" + doc[stop:])

"""The one writer of the marked, script-owned sections of the pages in ``docs/``, and the
machine line each section carries.

A benchmark owns the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` of a page
and rewrites only that, so the hand-written prose around it survives every run.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
PERFORMANCE, QUALITY = DOCS / "performance.md", DOCS / "quality.md"


def replace_section(name: str, text: str, page: Path = PERFORMANCE) -> None:
    """Put ``text`` between the ``name`` markers of ``page`` (both markers must exist)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = page.read_text()
    start, stop = doc.index(begin) + len(begin), doc.index(end)
    page.write_text(doc[:start] + "\n" + text + "\n" + doc[stop:])


def table_text(caption: str, header: list[str], rows: list[str]) -> str:
    """A section's text: ``caption``, then a markdown table of ``header`` and ``rows`` (each
    row already a ``| … |`` line)."""
    head = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([caption, "", *head, *rows])


def machine_name(device: torch.device | str = "cpu", threads: int | None = None) -> str:
    """Where a table was measured: the GPU, or the CPU with its core count (and ``threads``
    torch threads where the caller's timing depends on them); torch's version."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    cpu += f", torch {torch.__version__}"
    return cpu if threads is None else f"{cpu} with {threads} thread(s)"

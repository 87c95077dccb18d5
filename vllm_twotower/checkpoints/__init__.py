"""Checkpoints shipped inside the package (the embedded default)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent

#: A tiny *random* TwoTower checkpoint in the real layout (``make_tiny --seed 0``); the default
#: until the trained embedded checkpoint lands.
TINY_RANDOM = _HERE / "tiny-random"

#: What the main job, the examples and the benchmarks load when no checkpoint is named.
DEFAULT_CHECKPOINT = TINY_RANDOM

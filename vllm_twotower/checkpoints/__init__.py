"""Checkpoints shipped inside the package (the embedded default)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent

#: A tiny *random* TwoTower checkpoint in the real layout (``make_tiny --seed 0``), for tests
#: that need a model whose weights mean nothing (commit-rule ties, shape checks).
TINY_RANDOM = _HERE / "tiny-random"

#: The small *trained* TwoTower model (``python -m vllm_twotower.train --out … --seed 0``): a
#: context tower trained as an AR model on the synthetic tasks and a denoiser trained with the
#: MDLM objective on top of it; its quality is in ``docs/quality.md``.
TWOTOWER_TASKS = _HERE / "twotower-tasks"

#: What the main job, the examples and the benchmarks load when no checkpoint is named.
DEFAULT_CHECKPOINT = TWOTOWER_TASKS

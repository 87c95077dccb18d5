"""Per-request TwoTower generation parameters and their validation.

Requests choose the generation mode and the diffusion knobs through
``SamplingParams.extra_args`` (the OpenAI server's ``vllm_xargs``).  Server-wide defaults come
from the checkpoint's ``generation_config.json`` (:class:`~vllm_twotower.config.DiffusionDefaults`).
The reference implementation and the engine both resolve requests through
:func:`resolve_params`, so a value is valid or invalid in the same way everywhere, and an invalid
one raises a ``ValueError`` that names the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_twotower.config import DiffusionDefaults

MASK_DIFFUSION, MOCK_AR, AR = "mask_diffusion", "mock_ar", "ar"
MODES = (MASK_DIFFUSION, MOCK_AR, AR)
#: The ``extra_args`` keys this plugin reads; other keys are left to whoever owns them.
EXTRA_ARG_KEYS = ("mode", "confidence_threshold", "steps_per_block", "block_size")


@dataclass(frozen=True)
class TwoTowerParams:
    """How one request is generated."""

    mode: str = MASK_DIFFUSION
    block_size: int = 16
    steps_per_block: int = 16
    confidence_threshold: float = 0.8

    @property
    def uses_denoiser(self) -> bool:
        return self.mode != AR


def _int_field(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def resolve_params(
    extra_args: Mapping[str, Any] | None, defaults: DiffusionDefaults, max_block_size: int
) -> TwoTowerParams:
    """Validate a request's ``extra_args`` against the model and fill in the defaults.

    Raises:
        ValueError: naming the offending field, for an unknown mode, a threshold outside
            (0, 1], a non-integer or non-positive step count, or a block size outside
            [1, ``max_block_size``] (the block size the denoiser was trained with).
    """
    args = dict(extra_args or {})
    mode = args.get("mode", MASK_DIFFUSION)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    threshold = args.get("confidence_threshold", defaults.confidence_threshold)
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not math.isfinite(threshold)
        or not 0.0 < threshold <= 1.0
    ):
        raise ValueError(f"confidence_threshold must be a number in (0, 1], got {threshold!r}")
    return TwoTowerParams(
        mode=mode,
        block_size=_int_field(
            "block_size", args.get("block_size", defaults.block_size), 1, max_block_size
        ),
        steps_per_block=_int_field(
            "steps_per_block", args.get("steps_per_block", defaults.steps_per_block), 1
        ),
        confidence_threshold=float(threshold),
    )

"""Per-request parameters: defaults and ValueErrors that name the field."""

from __future__ import annotations

import pytest

from vllm_twotower.config import DiffusionDefaults
from vllm_twotower.params import MASK_DIFFUSION, MOCK_AR, TwoTowerParams, resolve_params

DEFAULTS = DiffusionDefaults(block_size=16, steps_per_block=16, confidence_threshold=0.8)


def test_defaults_fill_in() -> None:
    assert resolve_params(None, DEFAULTS, 16) == TwoTowerParams(MASK_DIFFUSION, 16, 16, 0.8)
    got = resolve_params({"mode": "mock_ar", "steps_per_block": 4.0, "other": 1}, DEFAULTS, 16)
    assert got == TwoTowerParams(MOCK_AR, 16, 4, 0.8)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"mode": "fast"}, "mode"),
        ({"confidence_threshold": 0.0}, "confidence_threshold"),
        ({"confidence_threshold": 1.01}, "confidence_threshold"),
        ({"confidence_threshold": "high"}, "confidence_threshold"),
        ({"confidence_threshold": float("nan")}, "confidence_threshold"),
        ({"steps_per_block": 2.5}, "steps_per_block"),
        ({"steps_per_block": 0}, "steps_per_block"),
        ({"steps_per_block": True}, "steps_per_block"),
        ({"block_size": 32}, "block_size"),
        ({"block_size": "16"}, "block_size"),
    ],
)
def test_invalid_values_name_the_field(args: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        resolve_params(args, DEFAULTS, 16)

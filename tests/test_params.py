"""Per-request parameters: defaults and ValueErrors that name the field."""

from __future__ import annotations

import pytest

from vllm_twotower.config import DiffusionDefaults
from vllm_twotower.params import (
    MASK_DIFFUSION,
    MAX_STEPS_PER_BLOCK_FACTOR,
    MOCK_AR,
    TwoTowerParams,
    max_steps_per_block,
    resolve_params,
)

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
        # Upper bounds, whatever the mode (issue #17: these passed admission and then
        # overflowed the worker's int64 tables, killing the engine).
        ({"mode": "mask_diffusion", "steps_per_block": 1e30}, "steps_per_block"),
        ({"mode": "ar", "steps_per_block": 2**63}, "steps_per_block"),
        ({"mode": "mock_ar", "steps_per_block": 2**64 - 1}, "steps_per_block"),
        ({"mode": "ar", "steps_per_block": 65}, "steps_per_block"),
        ({"mode": "ar", "block_size": 17}, "block_size"),
        ({"block_size": -(2**63)}, "block_size"),
        ({"steps_per_block": float("inf")}, "steps_per_block"),
        ({"steps_per_block": float("nan")}, "steps_per_block"),
        ({"confidence_threshold": float("inf")}, "confidence_threshold"),
        ({"confidence_threshold": 10**400}, "confidence_threshold"),
        ({"mode": ["ar"]}, "mode"),
        # The plugin's namespace: reserved prefix and near misses of its keys.
        ({"twotower_mode": "ar"}, "twotower_mode"),
        ({"TwoTower.block": 4}, "TwoTower.block"),
        ({"steps_per_blocks": 4}, "steps_per_block"),
        ({"blockSize": 4}, "block_size"),
        ({"confidence-threshold": 0.5}, "confidence_threshold"),
        ({"mode": "speculative", "draft_threshold": 0.0}, "draft_threshold"),
        ({"mode": "speculative", "draft_threshold": 1.5}, "draft_threshold"),
        ({"mode": "speculative", "draft_threshold": "x"}, "draft_threshold"),
        ({"mode": "ar", "draft_threshold": float("nan")}, "draft_threshold"),
        ({"draftThreshold": 0.5}, "draft_threshold"),
    ],
)
def test_invalid_values_name_the_field(args: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        resolve_params(args, DEFAULTS, 16)


def test_bounds_are_inclusive_and_documented() -> None:
    top = max_steps_per_block(16)
    assert top == MAX_STEPS_PER_BLOCK_FACTOR * 16
    got = resolve_params({"mode": "ar", "steps_per_block": top, "block_size": 16}, DEFAULTS, 16)
    assert (got.steps_per_block, got.block_size) == (top, 16)
    assert resolve_params({"confidence_threshold": 1}, DEFAULTS, 16).confidence_threshold == 1.0
    assert resolve_params({"draft_threshold": 1}, DEFAULTS, 16).draft_threshold == 1.0


def test_speculative_draft_parameters() -> None:
    """One pass with every position decided by default; γ gives the commit rule more passes."""
    one_pass = resolve_params({"mode": "speculative"}, DEFAULTS, 16).draft()
    assert (one_pass.steps_per_block, one_pass.draft_threshold) == (1, None)
    gamma = resolve_params({"mode": "speculative", "draft_threshold": 0.5}, DEFAULTS, 16).draft()
    assert (gamma.steps_per_block, gamma.confidence_threshold) == (16, 0.5)


def test_other_owners_keys_are_left_alone() -> None:
    """vLLM's own ``extra_args`` keys and other extensions' keys are not the plugin's."""
    args = {"kv_transfer_params": {"x": 1}, "kv_cache_report_mode": "x", "my_processor": 3}
    assert resolve_params(args, DEFAULTS, 16) == resolve_params(None, DEFAULTS, 16)


def test_huge_values_are_cut_in_messages() -> None:
    with pytest.raises(ValueError, match="steps_per_block") as error:
        resolve_params({"steps_per_block": 10**400}, DEFAULTS, 16)
    assert len(str(error.value)) < 120

"""Reference ``auto`` (issue #24): replaying a schedule of diffusion blocks and AR tokens.

The engine chooses each ``auto`` step by load and records it (``twotower_stats``); the
reference replays that schedule.  These tests hold the replay to the fixed modes it is made
of, so it is not its own oracle: an AR step is ``ar``'s token, a diffusion step is the block
``mask_diffusion`` denoises after the same text, and a speculative schedule's AR steps leave
the output ``ar``'s.
"""

from __future__ import annotations

import pytest

from vllm_twotower.params import AR, AUTO, MASK_DIFFUSION, SPECULATIVE, TwoTowerParams
from vllm_twotower.reference import SamplingSpec, TwoTowerModel, generate

PROMPT = [1, 9, 8, 7, 30, 31]


@pytest.mark.parametrize("sampling", [SamplingSpec(40), SamplingSpec(40, 0.9, seed=5)])
def test_fixed_schedules_are_the_fixed_modes(tiny_model: TwoTowerModel, sampling) -> None:
    for mode, step in ((MASK_DIFFUSION, "d"), (AR, "a")):
        (fixed,) = generate(tiny_model, [PROMPT], TwoTowerParams(mode=mode), sampling)
        (auto,) = generate(tiny_model, [PROMPT], TwoTowerParams(mode=AUTO), sampling, [step * 40])
        assert auto.output_ids == fixed.output_ids and auto.nfe == fixed.nfe, mode
        assert auto.logprobs == fixed.logprobs


@pytest.mark.parametrize("sampling", [SamplingSpec(30), SamplingSpec(30, 1.1, seed=9)])
def test_a_switch_starts_the_block_where_the_committed_text_ends(
    tiny_model: TwoTowerModel, sampling
) -> None:
    """``a a a a d d …`` with blocks of 4: four of ``ar``'s tokens, then the blocks
    ``mask_diffusion`` denoises after the prompt and those tokens (noise is keyed by absolute
    position, so sampled runs compose too)."""
    params = TwoTowerParams(mode=AUTO, block_size=4)
    (auto,) = generate(tiny_model, [PROMPT], params, sampling, ["aaaa" + "d" * 7])
    (ar,) = generate(tiny_model, [PROMPT], TwoTowerParams(mode=AR), sampling)
    assert auto.output_ids[:4] == ar.output_ids[:4]
    rest = SamplingSpec(26, sampling.temperature, sampling.seed)
    blocks = TwoTowerParams(mode=MASK_DIFFUSION, block_size=4)
    (diffusion,) = generate(tiny_model, [PROMPT + ar.output_ids[:4]], blocks, rest)
    assert auto.output_ids[4:] == diffusion.output_ids
    assert auto.tokens_per_step[:4] == [1, 1, 1, 1]


def test_blocks_start_only_on_the_block_grid(tiny_model: TwoTowerModel) -> None:
    """Back from AR to blocks only a whole number of blocks after the prompt, where
    ``mask_diffusion``'s blocks start (the engine's policy never schedules otherwise)."""
    params = TwoTowerParams(mode=AUTO, block_size=4)
    with pytest.raises(ValueError, match="4-token block grid, not 3 tokens into a block"):
        generate(tiny_model, [PROMPT], params, SamplingSpec(20), ["aaad" + "a" * 20])
    (auto,) = generate(tiny_model, [PROMPT], params, SamplingSpec(20), ["daaaadaaaad"])
    assert len(auto.output_ids) == 20


def test_speculative_ar_steps_skip_the_draft(tiny_model: TwoTowerModel) -> None:
    sampling = SamplingSpec(30, 0.8, seed=3)
    (ar,) = generate(tiny_model, [PROMPT], TwoTowerParams(mode=AR), sampling)
    params = TwoTowerParams(mode=SPECULATIVE)
    (drafted,) = generate(tiny_model, [PROMPT], params, sampling)
    (mixed,) = generate(tiny_model, [PROMPT], params, sampling, ["asas" + "a" * 30])
    assert drafted.output_ids == mixed.output_ids == ar.output_ids
    assert len(mixed.accepted) == 2 and mixed.nfe == 2  # one pass per draft, two drafts
    assert mixed.tokens_per_step[0] == 1


def test_schedules_are_checked(tiny_model: TwoTowerModel) -> None:
    with pytest.raises(ValueError, match="auto needs the schedule"):
        generate(tiny_model, [PROMPT], TwoTowerParams(mode=AUTO))
    with pytest.raises(ValueError, match="holds only"):
        generate(tiny_model, [PROMPT], TwoTowerParams(mode=AUTO), SamplingSpec(8), ["ds"])
    with pytest.raises(ValueError, match="ended before"):
        generate(tiny_model, [PROMPT], TwoTowerParams(mode=AUTO), SamplingSpec(40), ["a"])

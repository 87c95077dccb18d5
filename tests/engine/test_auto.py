"""Load-aware decoding (issue #24) with a fixed cost model: deterministic switches, replayed.

The engine here runs with ``--hf-overrides '{"auto_cost_model": COST}'``: its decisions
depend on the batch, never on timing, and ``engine_generate`` queues every request before the
first step, so the batches are the test's too.  Under ``COST`` (``load_policy.TERMS``: 10 ms per
step, 1 ms per context position, no per-pass cost, 1 ms per denoiser position) a lone ``auto``
request is worth a diffusion block (16 tokens for ~58 modelled ms against 1 for 11 ms), while
six or more live requests are worth one AR token each.  So a batch of auto requests of
different lengths starts with blocks while the others' prompts are still prefilled (beside a
64-token chunk a block costs little), takes AR steps once the batch decodes, and switches back
to blocks as it drains.  Every output must equal
the reference replaying the engine's schedule (``twotower_stats``), in a batch mixed with every
other mode; the switches must actually happen; the counters must agree with the schedule.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.conftest import ENGINE_KWARGS
from tests.engine.test_parity import (
    Case,
    check_engine_stats,
    engine_generate,
    engine_schedules,
    prompt_ids,
    reference_results,
)
from vllm_twotower.engine.load_policy import Candidate, StepCostModel, StepWork, choose_multi_token
from vllm_twotower.reference import TwoTowerModel

COST = [0.01, 0.001, 0.0, 0.001]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path):
    from vllm import LLM

    overrides = {"auto_cost_model": COST}
    engine = LLM(model=str(tiny_checkpoint), hf_overrides=overrides, **ENGINE_KWARGS)
    yield engine
    del engine


def test_the_fixed_model_switches_with_the_batch() -> None:
    """The policy itself, on the numbers the module docstring gives."""
    model = StepCostModel(COST)
    block = Candidate(tokens=16, passes=2, width=16, context=16)
    nothing = StepWork(0, 0, 0)
    assert choose_multi_token(model, [block], 0, nothing) == [True]
    assert choose_multi_token(model, [block] * 8, 0, nothing) == [False] * 8
    # A block with one token left to commit is never worth its passes.
    last = Candidate(tokens=1, passes=2, width=16, context=1)
    assert choose_multi_token(model, [last], 0, nothing) == [False]


def test_auto_switches_and_matches_the_reference_replay(llm, tiny_checkpoint: Path) -> None:
    # At most two passes per block (the tiny random denoiser is rarely confident: with the
    # default budget its blocks take ~16 passes, which the policy learns never to pay).
    fast = {"mode": "auto", "steps_per_block": 2}
    auto = [Case(20 + 3 * i, fast, max_tokens=24 + 12 * i) for i in range(8)]
    auto[1] = Case(23, fast, 36, 0.9, 41, 2, (("top_k", 8),))
    auto[2] = Case(26, {**fast, "block_size": 8}, 80, 0.0, 0, None, (("min_p", 0.2),))
    others = [
        Case(15, {"mode": "ar"}, max_tokens=30),
        Case(17, {}, max_tokens=40),
        Case(19, {"mode": "mock_ar"}, max_tokens=12),
        Case(21, {"mode": "speculative"}, max_tokens=40, temperature=0.7, seed=3),
    ]
    cases = auto + others
    prompts = [prompt_ids(c.prompt_len, 400 + i) for i, c in enumerate(cases)]
    outs = engine_generate(llm, prompts, cases)
    schedules = engine_schedules(llm, outs)
    model = TwoTowerModel.from_pretrained(tiny_checkpoint)
    expected = reference_results(model, prompts, cases, schedules=schedules)
    for case, exp, out in zip(cases, expected, outs, strict=True):
        assert list(out.outputs[0].token_ids) == exp.output_ids, case
    auto_schedules = schedules[: len(auto)]
    assert all(s and set(s) <= {"a", "d"} for s in auto_schedules), auto_schedules
    # Prefill chunks in the step: a block; twelve requests decoding: AR tokens; as the batch
    # drains, blocks again, each on its block grid.
    assert all(s.startswith("d") for s in auto_schedules), auto_schedules
    # Every request of full blocks takes AR steps; the one of 8-token blocks (cheaper per
    # token under COST) keeps its blocks throughout.
    full = [
        s
        for case, s in zip(auto, auto_schedules, strict=True)
        if "block_size" not in case.extra_args
    ]
    assert all("a" in s for s in full), auto_schedules
    assert any("ad" in s for s in auto_schedules), auto_schedules
    for case, schedule in zip(auto, auto_schedules, strict=True):
        assert blocks_start_on_the_grid(schedule, case.extra_args.get("block_size", 16))
    check_engine_stats(llm, cases, outs)
    aggregate = llm.collective_rpc("twotower_stats")[0]["aggregate"]
    assert aggregate["auto_diffusion_steps"] > 0 and aggregate["auto_ar_steps"] > 0
    assert aggregate["step_cost_overhead_s"] == pytest.approx(COST[0])


def blocks_start_on_the_grid(schedule: str, block_size: int) -> bool:
    """Whether every block of ``schedule`` starts a whole number of blocks into the output (a
    block commits ``block_size`` tokens, an AR step one; the last step may be cut short)."""
    committed = 0
    for step in schedule:
        if step == "d" and committed % block_size:
            return False
        committed += block_size if step == "d" else 1
    return True


def test_speculative_drafts_only_when_it_pays(llm, tiny_checkpoint: Path) -> None:
    """Alone, a speculative request with 4-token drafts drafts; behind eleven busy AR requests
    it takes AR steps instead.  The tiny model's drafts are rarely accepted, so a draft step
    emits ~2 tokens (c and the AR token after the first guess): under ``COST`` that pays for
    a 4-token draft's two passes (verification included) over 4 positions alone (~2 tokens
    for ~19 modelled ms against 1 for 11 ms), not beside eleven AR tokens.  Either way its
    output is ar's."""
    busy = [Case(30 + i, {"mode": "ar"}, max_tokens=40) for i in range(11)]
    spec = Case(25, {"mode": "speculative", "block_size": 4}, max_tokens=20)
    prompts = [prompt_ids(c.prompt_len, 500 + i) for i, c in enumerate([*busy, spec])]
    (alone,) = engine_generate(llm, prompts[-1:], [spec])
    crowded = engine_generate(llm, prompts, [*busy, spec])[-1]
    ar = Case(25, {"mode": "ar"}, max_tokens=20)
    model = TwoTowerModel.from_pretrained(tiny_checkpoint)
    (expected,) = reference_results(model, prompts[-1:], [ar])
    assert list(alone.outputs[0].token_ids) == list(crowded.outputs[0].token_ids)
    assert list(alone.outputs[0].token_ids) == expected.output_ids
    alone_schedule, crowded_schedule = engine_schedules(llm, [alone, crowded])
    assert alone_schedule.startswith("s"), alone_schedule
    assert crowded_schedule.startswith("a"), crowded_schedule

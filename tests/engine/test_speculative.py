"""Speculative mode through ``LLM()`` on the trained checkpoint: ``ar``'s output, token for token.

On the tiny random checkpoint of the parity tests the drafts are almost never accepted, so the
acceptance path (several tokens emitted per step, the next step consuming them) is exercised
here, on the embedded trained model whose denoiser drafts well: the engine's speculative output
must equal the engine's ``ar`` output and the reference's, with shared prompt prefixes (prefix
caching is on) and seeded sampling, and its accepted-token counters must be nontrivial and
consistent with what it emitted (:mod:`vllm_twotower.engine.stats_rules`).
"""

from __future__ import annotations

import pytest

from tests.engine.conftest import ENGINE_KWARGS
from tests.engine.test_parity import Case, engine_generate, reference_results
from vllm_twotower.checkpoints import TWOTOWER_TASKS
from vllm_twotower.data import generate_split, load_tokenizer
from vllm_twotower.engine.stats_rules import stats_mismatches
from vllm_twotower.reference import TwoTowerModel


@pytest.fixture(scope="module")
def llm():
    from vllm import LLM

    # A fixed schedule (every speculative step drafts): with load-aware decoding the drafts
    # depend on measured timings, and a run where none paid (seen in CI: 0 blocks) leaves
    # nothing for the acceptance checks to measure.
    engine = LLM(model=str(TWOTOWER_TASKS), hf_overrides={"load_aware": False}, **ENGINE_KWARGS)
    yield engine
    del engine


def _test_prompts(count: int) -> list[list[int]]:
    tokenizer = load_tokenizer(TWOTOWER_TASKS)
    return [tokenizer.encode(e.prompt).ids for e in generate_split("test", count, seed=0)]


def _check(llm, prompts: list[list[int]], spec_args: dict, **sampling) -> None:
    ar_cases = [Case(len(p), {"mode": "ar"}, max_tokens=32, **sampling) for p in prompts]
    spec_cases = [Case(len(p), spec_args, max_tokens=32, **sampling) for p in prompts]
    # One mixed batch: every prompt in both modes.
    outs = engine_generate(llm, prompts + prompts, ar_cases + spec_cases)
    ar_out, spec_out = outs[: len(prompts)], outs[len(prompts) :]
    expected = reference_results(TwoTowerModel.from_pretrained(TWOTOWER_TASKS), prompts, ar_cases)
    accepted = blocks = 0
    for case, exp, a, s in zip(spec_cases, expected, ar_out, spec_out, strict=True):
        assert list(s.outputs[0].token_ids) == list(a.outputs[0].token_ids) == exp.output_ids
        (entry,) = llm.collective_rpc("twotower_stats", kwargs={"request_id": s.request_id})[0][
            "requests"
        ].values()
        block_size = spec_args.get("block_size", 16)
        problems = stats_mismatches(
            entry,
            tokens=len(s.outputs[0].token_ids),
            block_size=block_size,
            steps_per_block=block_size,
        )
        assert not problems, (case, problems)
        accepted, blocks = accepted + entry["accepted_tokens"], blocks + entry["blocks"]
    assert accepted / blocks > 0.5  # the drafts are worth something: not ar with extra steps


def test_greedy_matches_ar_and_reference(llm) -> None:
    prompts = _test_prompts(16)
    prompts += [prompts[0] + prompts[1], prompts[0] + prompts[2]]  # shared prefixes
    _check(llm, prompts, {"mode": "speculative"})


def test_seeded_sampling_and_draft_threshold_match_ar(llm) -> None:
    _check(
        llm,
        _test_prompts(12),
        {"mode": "speculative", "draft_threshold": 0.6, "block_size": 8},
        temperature=0.8,
        seed=5,
    )


@pytest.mark.slow
def test_test_split_matches_ar(llm) -> None:
    """The quality suite's 800 test-split prompts, greedy (issue #20's evidence)."""
    _check(llm, _test_prompts(800), {"mode": "speculative"})

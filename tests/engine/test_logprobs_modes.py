"""Output logprobs beyond the default: ``--logprobs-mode processed_logprobs`` and
``logprob_token_ids``, held to the reference in every mode (``docs/engine-design.md`` §5).

``test_parity.py`` covers the default ``raw_logprobs``; a server's logprobs mode is an engine
setting, so this module starts its own engine (with ``max_logprobs=-1``, so a request can ask
for the whole vocabulary).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.conftest import ENGINE_KWARGS
from tests.engine.test_parity import (
    Case,
    check_logprobs,
    engine_generate,
    prompt_ids,
    reference_results,
)
from vllm_twotower.reference import TwoTowerModel

MODE = "processed_logprobs"

#: Sampled and greedy rows of every mode, with filters, bias, penalties and bad words: what
#: ``processed`` adds to ``raw`` (temperature, the kept set, the adjustments) shows in each.
CASES = [
    Case(9, {"mode": "ar"}, 16, 1.3, 31, 2, (("top_k", 5), ("logit_bias", ((7, 2.0),)))),
    Case(7, {"mode": "ar"}, 12, 0.0, 0, 1, (("repetition_penalty", 1.4), ("bad_words", ((16,),)))),
    Case(20, {}, 16, 0.9, 32, 1, (("min_p", 0.1), ("presence_penalty", 0.5))),
    Case(12, {"mode": "mock_ar"}, 12, 1.1, 33, 1, (("top_p", 0.8),)),
    Case(30, {"mode": "speculative"}, 16, 0.8, 34, 2, (("top_k", 8),)),
]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path):
    from vllm import LLM

    # A fixed schedule (every speculative step drafts, as the reference does): with load-aware
    # decoding whether a step drafts depends on measured timings (test_speculative saw a CI
    # run with no draft at all), and a token's logprob from a verification pass differs from
    # vLLM's forward's in the last bits, more than the 1e-6 this module compares runs to.
    engine = LLM(
        model=str(tiny_checkpoint),
        logprobs_mode=MODE,
        max_logprobs=-1,
        hf_overrides={"load_aware": False},
        **ENGINE_KWARGS,
    )
    yield engine
    del engine


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> TwoTowerModel:
    return TwoTowerModel.from_pretrained(tiny_checkpoint)


def test_processed_logprobs_match_the_reference(llm, model: TwoTowerModel) -> None:
    prompts = [prompt_ids(c.prompt_len, 200 + i) for i, c in enumerate(CASES)]
    expected = reference_results(model, prompts, CASES, logprobs_mode=MODE)
    raw = reference_results(model, prompts, CASES)
    outs = engine_generate(llm, prompts, CASES)
    for case, exp, out in zip(CASES, expected, outs, strict=True):
        assert list(out.outputs[0].token_ids) == exp.output_ids, case
        check_logprobs(out.outputs[0], exp.logprobs, case.logprobs)
    # Not vacuous: in each case the processed values differ from the raw ones.
    for case, exp, plain in zip(CASES, expected, raw, strict=True):
        assert exp.logprobs != pytest.approx(plain.logprobs, abs=1e-4), case


@pytest.mark.parametrize("mode", ["ar", "mask_diffusion", "mock_ar", "speculative"])
def test_logprob_token_ids_report_the_named_ids(llm, model: TwoTowerModel, mode: str) -> None:
    """The named ids' values are those a whole-vocabulary request reports at every position,
    after the emitted token (whose value is the reference's)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    named = [5, 9, 40, 77]
    prompt = prompt_ids(11, 300)
    (exp,) = reference_results(model, [prompt], [Case(11, {"mode": mode}, 20)], MODE)
    common = {"max_tokens": 20, "temperature": 0.0, "extra_args": {"mode": mode}}
    request = TokensPrompt(prompt_token_ids=prompt)
    (full,) = llm.generate([request], SamplingParams(logprobs=-1, **common))
    (picked,) = llm.generate([request], SamplingParams(logprob_token_ids=named, **common))
    assert list(full.outputs[0].token_ids) == list(picked.outputs[0].token_ids) == exp.output_ids
    steps = zip(picked.outputs[0].token_ids, picked.outputs[0].logprobs, strict=True)
    for position, (token, entries) in enumerate(steps):
        assert set(entries) == {token, *named}
        assert entries[token].logprob == pytest.approx(exp.logprobs[position], abs=1e-4)
        whole = full.outputs[0].logprobs[position]
        for i in named:
            assert entries[i].logprob == pytest.approx(whole[i].logprob, abs=1e-6), (position, i)

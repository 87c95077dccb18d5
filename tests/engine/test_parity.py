"""Token-exact parity of the vLLM engine with the reference implementation, all modes.

One engine serves a single batch mixing modes, per-request parameters, prompt lengths from 1
token to several hundred (longer than a scheduler chunk, so prefills span several steps),
greedy and seeded sampled decoding; every output must equal the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.engine.conftest import ENGINE_KWARGS
from vllm_twotower.data.tokenizer import build_tokenizer
from vllm_twotower.engine.stats_rules import stats_mismatches
from vllm_twotower.params import TwoTowerParams
from vllm_twotower.reference import TwoTowerModel
from vllm_twotower.reference.generate import SamplingSpec, generate

EOS = 2


@dataclass(frozen=True)
class Case:
    prompt_len: int
    extra_args: dict
    max_tokens: int = 40
    temperature: float = 0.0
    seed: int = 0
    logprobs: int | None = None
    #: vLLM's filters, penalties and logit bias (SamplingSpec's and SamplingParams' names)
    knobs: tuple[tuple[str, object], ...] = ()

    def sampling_params_knobs(self) -> dict:
        knobs = dict(self.knobs)
        if "bad_words" in knobs:  # the reference takes ids; vLLM's front end tokenizes text
            tokenizer = build_tokenizer()
            knobs["bad_words"] = [tokenizer.decode(list(ids)) for ids in knobs["bad_words"]]
        if "logit_bias" in knobs:
            knobs["logit_bias"] = dict(knobs["logit_bias"])
        if "allowed_token_ids" in knobs:
            knobs["allowed_token_ids"] = list(knobs["allowed_token_ids"])
        return knobs


CASES = [
    Case(1, {}),  # mask_diffusion by default; a one-token prompt
    Case(7, {"mode": "ar"}, logprobs=3),
    Case(16, {"mode": "mock_ar"}, max_tokens=20, logprobs=0),  # prompt ends at a block boundary
    Case(33, {"confidence_threshold": 0.5, "steps_per_block": 8}, logprobs=2),
    Case(100, {"block_size": 8, "steps_per_block": 4}),
    Case(300, {"mode": "mask_diffusion", "confidence_threshold": 0.95}),
    Case(64, {"mode": "ar"}, temperature=0.8, seed=11),
    Case(20, {}, temperature=0.7, seed=12, logprobs=1),
    Case(5, {"mode": "mock_ar"}, max_tokens=12, temperature=1.0, seed=13),
    Case(50, {"block_size": 16}, max_tokens=5),  # max_tokens smaller than a block
    Case(129, {"block_size": 4, "steps_per_block": 2, "confidence_threshold": 1.0}),
    Case(64, {}, max_tokens=32),  # prompt of whole scheduler chunks and whole blocks
    Case(32, {"mode": "ar"}, max_tokens=16),
    # Seeded sampling through vLLM's filters, in every mode.
    Case(9, {"mode": "ar"}, 24, 1.3, 21, 2, (("top_k", 5), ("top_p", 0.8))),
    Case(40, {}, 24, 1.2, 22, 1, (("min_p", 0.1), ("top_p", 0.9))),
    Case(12, {"mode": "mock_ar"}, 12, 1.5, 23, None, (("top_k", 3), ("min_p", 0.05))),
    Case(25, {"block_size": 8}, 16, 2.0, 24, None, (("top_k", 2),)),
    # Penalties and logit bias, greedy and sampled, in every mode.
    Case(
        11,
        {"mode": "ar"},
        20,
        0.0,
        0,
        2,
        (("repetition_penalty", 1.5), ("logit_bias", ((7, 4.0),))),
    ),
    Case(30, {}, 24, 0.0, 0, 1, (("presence_penalty", 1.5), ("frequency_penalty", 0.8))),
    Case(
        8,
        {"mode": "mock_ar"},
        12,
        0.9,
        25,
        None,
        (("frequency_penalty", 1.0), ("logit_bias", ((9, 3.0), (12, -5.0)))),
    ),
    Case(45, {"block_size": 8}, 16, 1.1, 26, None, (("repetition_penalty", 1.3), ("top_k", 4))),
    Case(14, {}, 16, 0.0, 0, 1, (("allowed_token_ids", (5, 9, 17, 30, 41)),)),
    Case(10, {"mode": "ar"}, 10, 0.7, 28, 1, (("allowed_token_ids", (5, 9, 17, 30)),)),
    Case(6, {"mode": "mock_ar"}, 8, 1.0, 27, None, (("allowed_token_ids", (5, 9, 17)),)),
    # speculative (issue #20): ar's output, drafted a block at a time
    Case(9, {"mode": "speculative"}, logprobs=2),
    Case(70, {"mode": "speculative", "block_size": 5}, max_tokens=23),
    Case(40, {"mode": "speculative", "draft_threshold": 0.3}, temperature=0.9, seed=14),
    Case(3, {"mode": "speculative"}, max_tokens=1),  # c alone is the whole output
    # speculative under vLLM's filters: the verification draws as ar does
    Case(41, {"mode": "speculative"}, 24, 1.2, 22, None, (("min_p", 0.1), ("top_p", 0.9))),
    # bad words (one-token modes): a one-id word and a two-id one, each in the free output
    Case(13, {"mode": "ar"}, 16, 0.0, 0, 2, (("bad_words", ((16,), (8, 53))),)),
    Case(15, {"mode": "mock_ar"}, 12, 1.0, 29, 1, (("bad_words", ((48,), (65, 71))),)),
    # auto (issue #24): blocks or AR tokens as the engine's load model chooses, replayed
    Case(18, {"mode": "auto"}, max_tokens=40, logprobs=1),
    Case(26, {"mode": "auto", "block_size": 8}, 30, 0.9, 35, None, (("top_k", 6),)),
    Case(4, {"mode": "auto"}, 20, 0.0, 0, None, (("presence_penalty", 0.8),)),
]


def prompt_ids(length: int, salt: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 + salt)
    return [1, *torch.randint(4, 128, (length - 1,), generator=g).tolist()][:length]


def reference_outputs(model: TwoTowerModel, prompts, cases) -> list[list[int]]:
    return [r.output_ids for r in reference_results(model, prompts, cases)]


def reference_results(
    model: TwoTowerModel,
    prompts,
    cases,
    logprobs_mode: str = "raw_logprobs",
    schedules: list[str | None] | None = None,
):
    """The reference's results for ``cases``; ``schedules`` (:func:`engine_schedules`) replays
    the steps the engine chose for auto and speculative requests."""
    defaults = model.config.diffusion
    params, sampling = [], []
    for case in cases:
        args = {"mode": "mask_diffusion", **case.extra_args}
        params.append(
            TwoTowerParams(
                mode=args["mode"],
                block_size=args.get("block_size", defaults.block_size),
                steps_per_block=args.get("steps_per_block", defaults.steps_per_block),
                confidence_threshold=args.get(
                    "confidence_threshold", defaults.confidence_threshold
                ),
                draft_threshold=args.get("draft_threshold"),
            )
        )
        sampling.append(
            SamplingSpec(
                max_new_tokens=case.max_tokens,
                temperature=case.temperature,
                seed=case.seed,
                logprobs_mode=logprobs_mode,
                **dict(case.knobs),
            )
        )
    return generate(model, prompts, params, sampling, schedules)


def engine_schedules(llm, outs) -> list[str | None]:
    """What each engine step did for each request (``twotower_stats``' schedule: auto and
    speculative requests; ``None`` for the others, which take their mode's one step)."""
    schedules = []
    for out in outs:
        kwargs = {"request_id": out.request_id}
        (entry,) = llm.collective_rpc("twotower_stats", kwargs=kwargs)[0]["requests"].values()
        schedules.append(entry.get("schedule"))
    return schedules


def check_engine_stats(llm, cases, outs) -> None:
    """Each request's counters agree with what it emitted (``engine/stats_rules.py``)."""
    for case, out in zip(cases, outs, strict=True):
        kwargs = {"request_id": out.request_id}
        (entry,) = llm.collective_rpc("twotower_stats", kwargs=kwargs)[0]["requests"].values()
        problems = stats_mismatches(
            entry,
            tokens=len(out.outputs[0].token_ids),
            block_size=case.extra_args.get("block_size", 16),
            steps_per_block=case.extra_args.get("steps_per_block", 16),
        )
        assert not problems, (case, problems)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path):
    from vllm import LLM

    engine = LLM(model=str(tiny_checkpoint), **ENGINE_KWARGS)
    yield engine
    del engine


def engine_outputs(llm, prompts, cases, n: int = 1) -> list[list[list[int]]]:
    outs = engine_generate(llm, prompts, cases, n)
    return [[list(o.token_ids) for o in out.outputs] for out in outs]


def engine_generate(llm, prompts, cases, n: int = 1):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [
        SamplingParams(
            max_tokens=c.max_tokens,
            temperature=c.temperature,
            seed=c.seed if c.temperature > 0 else None,
            extra_args=c.extra_args,
            logprobs=c.logprobs,
            n=n,
            **c.sampling_params_knobs(),
        )
        for c in cases
    ]
    # Every request is queued before the first step (vLLM's documented way: a level-0 sleep
    # pauses scheduling, not admission), so the batches, and the schedules load-aware modes
    # choose from them, are the test's, not the timing of arrivals at the engine process.
    llm.sleep(level=0, mode="keep")
    llm.enqueue([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    llm.wake_up(tags=["scheduling"])
    return llm.wait_for_completion(use_tqdm=False)


def test_mixed_batch_matches_reference(llm, tiny_checkpoint: Path) -> None:
    prompts = [prompt_ids(c.prompt_len, i) for i, c in enumerate(CASES)]
    model = TwoTowerModel.from_pretrained(tiny_checkpoint)
    outs = engine_generate(llm, prompts, CASES)
    expected = reference_results(model, prompts, CASES, schedules=engine_schedules(llm, outs))
    for case, exp, out in zip(CASES, expected, outs, strict=True):
        got = list(out.outputs[0].token_ids)
        assert got == exp.output_ids, f"{case}: engine {got} != reference {exp.output_ids}"
        if case.logprobs is not None:
            check_logprobs(out.outputs[0], exp.logprobs, case.logprobs)
    # Observability: denoiser passes per request, as the reference counts them.
    for case, exp, out in zip(CASES, expected, outs, strict=True):
        kwargs = {"request_id": out.request_id}  # the worker matches the engine's internal ids
        (entry,) = llm.collective_rpc("twotower_stats", kwargs=kwargs)[0]["requests"].values()
        assert entry["nfe"] == exp.nfe, case
        assert entry["mode"] == case.extra_args.get("mode", "mask_diffusion")
    aggregate = llm.collective_rpc("twotower_stats")[0]["aggregate"]
    assert aggregate["tokens_per_nfe"] >= 1.0 and aggregate["steps_per_block"] >= 1.0


def test_knobs_change_what_the_reference_draws(tiny_checkpoint: Path) -> None:
    """The cases above with filters, penalties or bias are not vacuous: without them the
    reference draws other tokens (so an engine that ignored them would fail the parity test)."""
    model = TwoTowerModel.from_pretrained(tiny_checkpoint)
    # auto's steps are diffusion blocks and AR tokens, whose knobs the other cases check.
    filtered = [c for c in CASES if c.knobs and c.extra_args.get("mode") != "auto"]
    prompts = [prompt_ids(c.prompt_len, CASES.index(c)) for c in filtered]
    unfiltered = [Case(**{**vars(c), "knobs": ()}) for c in filtered]
    with_filters = reference_outputs(model, prompts, filtered)
    without = reference_outputs(model, prompts, unfiltered)
    assert all(a != b for a, b in zip(with_filters, without, strict=True))


def check_logprobs(output, expected: list[float], num_logprobs: int) -> None:
    """Each emitted token's logprob is the reference's (the distribution it was committed
    from), beside the ``num_logprobs`` most likely tokens, as vLLM's sampler reports them."""
    assert len(output.logprobs) == len(output.token_ids) == len(expected)
    for token, entries, value in zip(output.token_ids, output.logprobs, expected, strict=True):
        chosen = entries[token]
        assert chosen.logprob == pytest.approx(value, abs=1e-4)
        assert len(entries) == num_logprobs + (chosen.rank > num_logprobs)
        top = sorted(e.rank for t, e in entries.items() if t != token or e.rank <= num_logprobs)
        assert top == list(range(1, num_logprobs + 1))


def test_shared_prefixes_and_n(llm, tiny_checkpoint: Path) -> None:
    """Prompts sharing long prefixes, and n > 1 seeded samples (child i uses seed + i)."""
    base = prompt_ids(200, 99)
    prompts = [base, [*base, 5, 6, 7], base[:150]]
    modes = ["mask_diffusion", "ar", "mock_ar"]
    cases = [
        Case(len(p), {"mode": m}, max_tokens=24, temperature=0.9, seed=7)
        for p, m in zip(prompts, modes, strict=True)
    ]
    model = TwoTowerModel.from_pretrained(tiny_checkpoint)
    children = [Case(c.prompt_len, c.extra_args, c.max_tokens, c.temperature, 8) for c in cases]
    first = reference_outputs(model, prompts, cases)
    second = reference_outputs(model, prompts, children)
    got = engine_outputs(llm, prompts, cases, n=2)
    for a, b, outs in zip(first, second, got, strict=True):
        assert sorted(outs) == sorted([a, b])


def test_eos_inside_a_block_cuts_the_output(llm, tiny_checkpoint: Path) -> None:
    """A sampled diffusion request whose second block holds EOS mid-block (found by search
    on the seed-0 tiny checkpoint): the engine stops right after EOS, as the reference."""
    case = Case(9, {}, max_tokens=48, temperature=1.5, seed=40)
    prompt = prompt_ids(9, 5000)
    model = TwoTowerModel.from_pretrained(tiny_checkpoint)
    (expected,) = reference_outputs(model, [prompt], [case])
    assert expected[-1] == EOS and len(expected) % 16 != 0, "search result no longer holds"
    (got,) = engine_outputs(llm, [prompt], [case])
    assert got[0] == expected


@pytest.mark.parametrize(
    ("mode", "seed", "min_tokens"),
    [("mask_diffusion", 40, 40), ("ar", 54, 25), ("mock_ar", 45, 10)],
)
def test_min_tokens_holds_eos_back(
    llm, tiny_checkpoint: Path, mode: str, seed: int, min_tokens: int
) -> None:
    """Sampled requests that end with EOS before ``min_tokens`` (found by search on the seed-0
    tiny checkpoint) emit no EOS before it with ``min_tokens``, in the engine as the reference
    (in diffusion: EOS is banned for every block that starts shorter than ``min_tokens``)."""
    free = Case(9, {"mode": mode}, max_tokens=48, temperature=1.5, seed=seed)
    held = Case(**{**vars(free), "knobs": (("min_tokens", min_tokens),)})
    prompt = prompt_ids(9, 5000)
    model = TwoTowerModel.from_pretrained(tiny_checkpoint)
    (unconstrained, expected) = reference_outputs(model, [prompt, prompt], [free, held])
    assert unconstrained[-1] == EOS and len(unconstrained) < min_tokens, "search no longer holds"
    assert EOS not in expected[:min_tokens]
    (got,) = engine_outputs(llm, [prompt], [held])
    assert got[0] == expected


def test_invalid_request_is_rejected_and_others_continue(llm) -> None:
    """A bad per-request value is rejected at admission naming the field; serving goes on.

    vLLM re-raises a validator's ``ValueError`` as its ``VLLMValidationError`` (what it raises
    for every invalid sampling parameter, and what the server turns into HTTP 400).
    """
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=[1, 5, 9])
    for extra_args, field in [
        ({"mode": "beam"}, "mode"),
        ({"confidence_threshold": 0}, "confidence_threshold"),
        ({"block_size": 17}, "block_size"),
        ({"steps_per_block": 1.5}, "steps_per_block"),
    ]:
        with pytest.raises((ValueError, VLLMValidationError), match=field):
            llm.generate(prompt, SamplingParams(max_tokens=4, extra_args=extra_args))
    (out,) = llm.generate(prompt, SamplingParams(max_tokens=4, extra_args={"mode": "ar"}))
    assert len(out.outputs[0].token_ids) == 4

"""Speculative mode in the reference: ``ar``'s output, drafted by the trained denoiser.

The acceptance rule (:func:`vllm_twotower.commit.accept_draft`) only ever emits AR tokens, so
equality with ``ar`` is by construction; what these tests add is that it holds through the
whole loop (EOS, ``max_new_tokens``, sampling noise keys) on the trained checkpoint, and that
the drafts are good enough for the mode to be worth having (accepted length well above one).
"""

from __future__ import annotations

import pytest
import torch

from vllm_twotower.checkpoints import TWOTOWER_TASKS
from vllm_twotower.commit import accept_draft
from vllm_twotower.data import generate_split, load_tokenizer
from vllm_twotower.params import AR, SPECULATIVE, TwoTowerParams
from vllm_twotower.reference import SamplingSpec, TwoTowerModel, generate


@pytest.fixture(scope="module")
def tasks_model() -> TwoTowerModel:
    return TwoTowerModel.from_pretrained(TWOTOWER_TASKS, dtype=torch.float32)


def _test_prompts(count: int) -> list[list[int]]:
    tokenizer = load_tokenizer(TWOTOWER_TASKS)
    return [tokenizer.encode(e.prompt).ids for e in generate_split("test", count, seed=0)]


def test_acceptance_rule() -> None:
    """Leading guesses equal to the AR tokens, then the AR token at the first mismatch."""
    vocab = 6
    ar = torch.tensor([[3, 4, 5, 1], [2, 2, 2, 2], [1, 1, 1, 1]])
    logits = torch.nn.functional.one_hot(ar, vocab).float() * 10
    draft = torch.tensor([[0, 3, 4, 0], [0, 2, 2, 2], [0, 1, 1, 1]])
    got_ar, accepted = accept_draft(
        draft,
        logits,
        length=torch.tensor([4, 4, 2]),
        temperature=torch.zeros(3),
        seed=torch.zeros(3, dtype=torch.long),
        block_start=torch.zeros(3, dtype=torch.long),
    )
    assert torch.equal(got_ar, ar)
    # row 0: two guesses right, third wrong; row 1: all right; row 2: only its length counts
    assert accepted.tolist() == [2, 3, 1]


@pytest.mark.parametrize(
    ("sampling", "params"),
    [
        (SamplingSpec(max_new_tokens=24), TwoTowerParams(SPECULATIVE)),
        (SamplingSpec(max_new_tokens=24), TwoTowerParams(SPECULATIVE, draft_threshold=0.7)),
        (SamplingSpec(max_new_tokens=24), TwoTowerParams(SPECULATIVE, block_size=5)),
        (
            SamplingSpec(max_new_tokens=24, temperature=0.8, seed=7),
            TwoTowerParams(SPECULATIVE),
        ),
    ],
    ids=["greedy", "draft-threshold", "block-5", "seeded"],
)
def test_speculative_equals_ar(
    tasks_model: TwoTowerModel, sampling: SamplingSpec, params: TwoTowerParams
) -> None:
    prompts = _test_prompts(24)
    ar = generate(tasks_model, prompts, TwoTowerParams(AR), sampling)
    spec = generate(tasks_model, prompts, params, sampling)
    for a, s in zip(ar, spec, strict=True):
        assert s.output_ids == a.output_ids
        assert s.finish_reason == a.finish_reason
        assert s.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    accepted = [k for s in spec for k in s.accepted]
    steps = sum(len(s.tokens_per_step) for s in spec)
    tokens = sum(len(s.output_ids) for s in spec)
    # Nontrivial drafts: on average a verification lets more than the AR token after c through
    # (k > 0), and a step emits clearly more than ar's one token.
    assert sum(accepted) / len(accepted) > 0.5
    assert tokens / steps > 1.5
    if params.draft_threshold is not None:
        assert sum(s.nfe for s in spec) > len(accepted)  # γ took more than one pass per draft


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_speculative_equals_ar_on_the_test_split(
    tasks_model: TwoTowerModel, temperature: float
) -> None:
    prompts = _test_prompts(800)
    sampling = SamplingSpec(max_new_tokens=32, temperature=temperature, seed=3)
    ar = generate(tasks_model, prompts, TwoTowerParams(AR), sampling)
    spec = generate(tasks_model, prompts, TwoTowerParams(SPECULATIVE), sampling)
    assert [s.output_ids for s in spec] == [a.output_ids for a in ar]


def test_c_may_be_the_mask_id(tiny_model: TwoTowerModel) -> None:
    """``ar`` may emit the mask id (no suppression), which the commit rule reads as undecided:
    the draft must still start with ``c`` (found by the preemption test's tiny random model)."""
    prompt = [1, *torch.randint(4, 128, (148,), generator=torch.Generator().manual_seed(1307))]
    sampling = SamplingSpec(max_new_tokens=100)
    (ar,) = generate(tiny_model, [prompt], TwoTowerParams(AR), sampling)
    (spec,) = generate(tiny_model, [prompt], TwoTowerParams(SPECULATIVE), sampling)
    assert tiny_model.config.diffusion.mask_token_id in ar.output_ids
    assert spec.output_ids == ar.output_ids


def test_max_new_tokens_cuts_before_a_later_eos(tasks_model: TwoTowerModel) -> None:
    """A step that emits past ``max_new_tokens`` is cut there even if an EOS follows in it
    (``ar`` never sees that EOS); the reference once cut at the EOS instead."""
    prompts = _test_prompts(2)
    sampling = SamplingSpec(max_new_tokens=8)
    ar = generate(tasks_model, prompts, TwoTowerParams(AR), sampling)
    spec = generate(tasks_model, prompts, TwoTowerParams(SPECULATIVE), sampling)
    assert [(r.output_ids, r.finish_reason) for r in spec] == [
        (r.output_ids, r.finish_reason) for r in ar
    ]
    assert "length" in [r.finish_reason for r in ar]

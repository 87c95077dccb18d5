"""Reference model: cached decoding equals recomputation, and generation in all three modes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_twotower.params import AR, MASK_DIFFUSION, MOCK_AR, TwoTowerParams
from vllm_twotower.reference import SamplingSpec, TwoTowerModel, generate

PROMPTS = [[1], [1, 9, 8, 7], list(range(5, 60)), [1, *range(20, 36)]]


@pytest.fixture(scope="module")
def model64(tiny_checkpoint: Path) -> TwoTowerModel:
    return TwoTowerModel.from_pretrained(tiny_checkpoint, dtype=torch.float64)


def _flatten(state) -> list[torch.Tensor]:
    return [t for cache in state.caches for t in cache]


def test_cached_decoding_equals_full_recomputation(model64: TwoTowerModel) -> None:
    ids = torch.randint(4, 100, (40,), generator=torch.Generator().manual_seed(0))
    full_logits, full_state = model64.extend_context(ids, model64.empty_context())
    state, steps = model64.empty_context(), []
    for token in ids:
        logits, state = model64.extend_context(token[None], state)
        steps.append(logits[0])
    torch.testing.assert_close(torch.stack(steps), full_logits)
    for a, b in zip(_flatten(state), _flatten(full_state), strict=True):
        torch.testing.assert_close(a, b)


def test_blockwise_extension_equals_token_by_token(model64: TwoTowerModel) -> None:
    prompt = torch.arange(10, 33)
    block = torch.arange(40, 56)
    _, ctx = model64.extend_context(prompt, model64.empty_context())
    block_logits, by_block = model64.extend_context(block, ctx)
    by_token, token_logits = ctx, []
    for token in block:
        logits, by_token = model64.extend_context(token[None], by_token)
        token_logits.append(logits[0])
    torch.testing.assert_close(torch.stack(token_logits), block_logits)
    assert by_block.length == by_token.length == len(prompt) + len(block)
    for a, b in zip(_flatten(by_block), _flatten(by_token), strict=True):
        torch.testing.assert_close(a, b)


def test_ar_generation_equals_greedy_recompute(tiny_model: TwoTowerModel) -> None:
    prompt = [1, 17, 23, 5]
    (result,) = generate(
        tiny_model,
        [prompt],
        TwoTowerParams(mode=AR),
        SamplingSpec(max_new_tokens=12, ignore_eos=True),
    )
    ids = list(prompt)
    for _ in range(12):  # no cache: the whole sequence every step
        logits, _ = tiny_model.extend_context(torch.tensor(ids), tiny_model.empty_context())
        ids.append(int(logits[-1].argmax()))
    assert result.output_ids == ids[len(prompt) :]
    assert result.nfe == 0 and result.tokens_per_step == [1] * 12


def test_mock_ar_step_definition(tiny_model: TwoTowerModel) -> None:
    prompt = [1, 40, 41, 42, 43]
    (result,) = generate(
        tiny_model,
        [prompt],
        TwoTowerParams(mode=MOCK_AR),
        SamplingSpec(max_new_tokens=3, ignore_eos=True),
    )
    ids = list(prompt)
    for _ in range(3):  # the denoiser on the last token, context state before it, no t
        _, before = tiny_model.extend_context(torch.tensor(ids[:-1]), tiny_model.empty_context())
        logits = tiny_model.denoise(torch.tensor(ids[-1:]), before, t=None)
        ids.append(int(logits[-1].argmax()))
    assert result.output_ids == ids[len(prompt) :]
    assert result.nfe == 3


def test_diffusion_threshold_extremes(tiny_model: TwoTowerModel) -> None:
    slow = TwoTowerParams(mode=MASK_DIFFUSION, confidence_threshold=1.0)  # nothing beats 1.0
    fast = TwoTowerParams(mode=MASK_DIFFUSION, confidence_threshold=1e-6)  # everything does
    spec = SamplingSpec(max_new_tokens=32, ignore_eos=True)
    slow_result, fast_result = generate(tiny_model, [PROMPTS[1]] * 2, [slow, fast], spec)
    assert slow_result.nfe == 32 and slow_result.tokens_per_step == [1] * 32
    assert fast_result.nfe == 2 and fast_result.tokens_per_step == [16, 16]
    assert 3 not in fast_result.output_ids + slow_result.output_ids  # mask never emitted


def test_diffusion_denoiser_depends_on_context(tiny_model: TwoTowerModel) -> None:
    canvas = torch.full((16,), 3)
    _, ctx_a = tiny_model.extend_context(torch.tensor(PROMPTS[2]), tiny_model.empty_context())
    _, ctx_b = tiny_model.extend_context(torch.tensor(PROMPTS[3]), tiny_model.empty_context())
    assert not torch.allclose(
        tiny_model.denoise(canvas, ctx_a, 1.0), tiny_model.denoise(canvas, ctx_b, 1.0)
    )
    assert not torch.allclose(
        tiny_model.denoise(canvas, ctx_a, 1.0), tiny_model.denoise(canvas, ctx_a, 0.5)
    )


@pytest.mark.parametrize("mode", [AR, MOCK_AR, MASK_DIFFUSION])
def test_batch_generation_in_every_mode(tiny_model: TwoTowerModel, mode: str) -> None:
    params = [
        TwoTowerParams(mode=mode, block_size=b, steps_per_block=s, confidence_threshold=g)
        for b, s, g in [(16, 16, 0.3), (8, 4, 0.8), (16, 2, 0.5), (4, 4, 0.05)]
    ]
    spec = [SamplingSpec(max_new_tokens=n) for n in (5, 17, 16, 1)]
    results = generate(tiny_model, PROMPTS, params, spec)
    again = generate(tiny_model, PROMPTS, params, spec)
    for result, repeat, s, p in zip(results, again, spec, params, strict=True):
        assert result.output_ids == repeat.output_ids  # deterministic
        assert 1 <= len(result.output_ids) <= s.max_new_tokens
        if result.finish_reason == "stop":
            assert result.output_ids[-1] == 2 and 2 not in result.output_ids[:-1]
        else:
            assert len(result.output_ids) == s.max_new_tokens
        if mode == MASK_DIFFUSION:
            assert sum(result.tokens_per_step) >= len(result.output_ids)
            blocks = -(-sum(result.tokens_per_step) // p.block_size)
            assert blocks <= result.nfe <= blocks * p.steps_per_block
        else:
            assert result.tokens_per_step == [1] * len(result.output_ids)
            assert result.nfe == (len(result.output_ids) if mode == MOCK_AR else 0)


@pytest.mark.parametrize("mode", [AR, MOCK_AR, MASK_DIFFUSION])
def test_seeded_sampling_is_reproducible(tiny_model: TwoTowerModel, mode: str) -> None:
    params = TwoTowerParams(mode=mode, confidence_threshold=0.3)
    outs = [
        generate(
            tiny_model,
            PROMPTS[1:3],
            params,
            SamplingSpec(max_new_tokens=16, temperature=1.5, seed=seed, ignore_eos=True),
        )
        for seed in (1, 1, 2)
    ]
    ids = [[r.output_ids for r in out] for out in outs]
    assert ids[0] == ids[1]
    assert ids[0] != ids[2]


def test_empty_prompt_is_rejected(tiny_model: TwoTowerModel) -> None:
    with pytest.raises(ValueError, match="prompt"):
        generate(tiny_model, [[]])


@pytest.mark.parametrize("mode", [AR, MOCK_AR, MASK_DIFFUSION])
def test_logprobs_are_those_of_the_emitted_tokens(tiny_model: TwoTowerModel, mode: str) -> None:
    """One log-probability per output token, under the distribution it was committed from."""
    prompt = [1, 20, 30, 40]
    (result,) = generate(
        tiny_model,
        [prompt],
        TwoTowerParams(mode=mode),
        SamplingSpec(max_new_tokens=21, ignore_eos=True),
    )
    assert len(result.logprobs) == len(result.output_ids) == 21
    assert all(value <= 0.0 for value in result.logprobs)
    if mode == AR:  # the context tower's distribution over the whole sequence, teacher-forced
        ids = torch.tensor(prompt + result.output_ids)
        logits, _ = tiny_model.extend_context(ids, tiny_model.empty_context())
        steps = torch.arange(len(prompt) - 1, len(ids) - 1)
        expected = torch.log_softmax(logits[steps], dim=-1)[torch.arange(21), ids[steps + 1]]
        assert result.logprobs == pytest.approx(expected.tolist(), abs=1e-5)
    if mode == MASK_DIFFUSION:  # greedy: the log of the commit confidence, never the mask id
        assert tiny_model.config.diffusion.mask_token_id not in result.output_ids

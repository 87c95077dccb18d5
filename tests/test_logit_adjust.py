"""Allowed ids, bad words, logit bias and penalties (``vllm_twotower.logit_adjust``) against
vLLM's own functions."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_twotower.logit_adjust import LogitAdjuster, adjustments_active, pad_bad_words


def _vllm_adjusted(
    logits, prompts, outputs, presence, frequency, repetition, bias, disallowed
) -> torch.Tensor:
    """vLLM's sampler: ``allowed_token_ids_mask``'s ``masked_fill_``, the logit-bias
    processor's ``+=``, then ``apply_penalties`` (prompts and outputs padded with ``vocab``, as
    ``vllm/v1/sample/ops/penalties.py`` pads them)."""
    from vllm.model_executor.layers.utils import apply_penalties

    vocab = logits.shape[-1]

    def padded(rows: list[torch.Tensor]) -> torch.Tensor:
        width = max(1, *(r.numel() for r in rows))
        out = torch.full((len(rows), width), vocab, dtype=torch.int64)
        for i, r in enumerate(rows):
            out[i, : r.numel()] = r
        return out

    logits = logits.masked_fill(disallowed, float("-inf")) + bias
    return apply_penalties(
        logits, padded(prompts), padded(outputs), presence, frequency, repetition
    )


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31), vocab=st.integers(2, 200))
def test_matches_vllm(seed: int, vocab: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rows = 5
    logits = torch.randn(rows, vocab, generator=g) * 4
    prompts = [
        torch.randint(0, vocab, (int(n),), generator=g)
        for n in torch.randint(1, 30, (rows,), generator=g)
    ]
    outputs = [
        torch.randint(0, vocab, (int(n),), generator=g)
        for n in torch.randint(0, 30, (rows,), generator=g)
    ]
    presence = torch.rand(rows, generator=g) * 4 - 2
    frequency = torch.rand(rows, generator=g) * 4 - 2
    repetition = torch.rand(rows, generator=g) * 1.9 + 0.1
    width = 3
    bias_ids = torch.randint(-1, vocab, (rows, width), generator=g)
    bias_ids[:, 1:] = torch.where(bias_ids[:, 1:] == bias_ids[:, :1], -1, bias_ids[:, 1:])
    bias_ids[:, 2] = torch.where(bias_ids[:, 2] == bias_ids[:, 1], -1, bias_ids[:, 2])
    bias_values = torch.rand(rows, width, generator=g) * 200 - 100
    allowed_ids = torch.randint(-1, vocab, (rows, 4), generator=g)
    allowed_ids[:2] = -1  # unrestricted rows
    disallowed = torch.ones(rows, vocab, dtype=torch.bool)
    for r in range(rows):
        listed = [i for i in allowed_ids[r].tolist() if i >= 0]
        disallowed[r, listed] = False
        if not listed:
            disallowed[r] = False
    # vLLM's MinTokensLogitsProcessor: stop ids to -inf while the output is shorter.
    min_tokens = torch.randint(0, 30, (rows,), generator=g)
    stop_ids = torch.randint(-1, vocab, (rows, 2), generator=g)
    for r in range(rows):
        if len(outputs[r]) < int(min_tokens[r]):
            disallowed[r, [i for i in stop_ids[r].tolist() if i >= 0]] = True
    # Bad words of 1-3 ids; half of them end the output (so their last id is banned).
    words: list[list[list[int]]] = []
    for r in range(rows):
        row_words = []
        for _ in range(int(torch.randint(0, 4, (1,), generator=g))):
            n = int(torch.randint(1, 4, (1,), generator=g))
            word = torch.randint(0, vocab, (n,), generator=g).tolist()
            if n > 1 and len(outputs[r]) >= n - 1 and bool(torch.rand(1, generator=g) < 0.5):
                word[:-1] = outputs[r][len(outputs[r]) - (n - 1) :].tolist()
            row_words.append(word)
        words.append(row_words)
    bad_words = torch.stack([pad_bad_words(w, 3, 3) for w in words])
    dense = torch.zeros(rows, vocab)
    for r in range(rows):
        for i, v in zip(bias_ids[r].tolist(), bias_values[r].tolist(), strict=True):
            if i >= 0:
                dense[r, i] = v
    adjuster = LogitAdjuster.build(
        vocab,
        prompts=prompts,
        outputs=outputs,
        presence=presence,
        frequency=frequency,
        repetition=repetition,
        bias_ids=bias_ids,
        bias_values=bias_values,
        allowed_ids=allowed_ids,
        min_tokens=min_tokens,
        stop_ids=stop_ids,
        bad_words=bad_words,
    )
    from vllm.v1.sample.ops.bad_words import apply_bad_words

    with_bad_words = logits.clone()
    apply_bad_words(
        with_bad_words, dict(enumerate(words)), [o.tolist() for o in outputs]
    )  # in place, as vLLM's sampler calls it
    expected = _vllm_adjusted(
        with_bad_words, prompts, outputs, presence, frequency, repetition, dense, disallowed
    )
    assert torch.equal(adjuster(logits), expected)
    # A diffusion block: one history per row, the same adjustment at every position.
    block = logits[:, None, :].expand(rows, 4, vocab)
    assert torch.equal(adjuster(block), expected[:, None, :].expand(rows, 4, vocab))


def test_neutral_rows_are_inactive_and_unchanged() -> None:
    zeros = torch.zeros(2)
    none = torch.full((2, 1), -1)
    no_min = torch.zeros(2, dtype=torch.int64)
    active = adjustments_active(zeros, zeros, torch.tensor([1.0, 1.2]), none, none, no_min)
    assert active.tolist() == [False, True]
    one_word = torch.stack([pad_bad_words([], 1, 2), pad_bad_words([[4, 5]], 1, 2)])
    active = adjustments_active(zeros, zeros, torch.ones(2), none, none, no_min, one_word)
    assert active.tolist() == [False, True]
    logits = torch.randn(2, 10)
    adjuster = LogitAdjuster.build(
        10,
        prompts=[torch.tensor([1, 2])] * 2,
        outputs=[torch.tensor([3])] * 2,
        presence=zeros,
        frequency=zeros,
        repetition=torch.ones(2),
        bias_ids=torch.full((2, 0), -1),
        bias_values=torch.zeros(2, 0),
        allowed_ids=torch.full((2, 0), -1),
        min_tokens=no_min,
        stop_ids=torch.full((2, 0), -1),
    )
    assert torch.equal(adjuster(logits), logits)

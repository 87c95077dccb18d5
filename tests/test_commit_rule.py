"""The commit rule (``vllm_twotower.commit``), checked against the spec's statements."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_twotower.commit import (
    LOGPROBS_MODES,
    SamplingFilters,
    commit_step,
    fold_seed,
    reported_logprobs,
    sampling_cutoff,
)

MASK = 3


def _run(
    logits,
    canvas,
    *,
    threshold=0.8,
    step=0,
    steps=16,
    temperature=0.0,
    seed=0,
    start=0,
    filters=None,
):
    b = canvas.shape[0]

    def full(value, dtype):
        return torch.full((b,), value, dtype=dtype)

    return commit_step(
        logits,
        canvas,
        mask_id=MASK,
        threshold=full(threshold, torch.float32),
        step=full(step, torch.long),
        steps_per_block=full(steps, torch.long),
        temperature=full(temperature, torch.float32),
        seed=full(fold_seed(seed), torch.long),
        block_start=full(start, torch.long),
        filters=filters,
    )


@st.composite
def _cases(draw):
    rows = draw(st.integers(1, 4))
    size = draw(st.integers(1, 16))
    vocab = draw(st.integers(5, 40))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, size, vocab, generator=g) * draw(st.sampled_from([0.5, 3.0, 10.0]))
    decided = torch.rand(rows, size, generator=g) < draw(st.floats(0.0, 1.0))
    canvas = torch.where(decided, torch.randint(4, vocab, (rows, size), generator=g), MASK)
    steps = draw(st.integers(1, 16))
    step = draw(st.integers(0, steps - 1))
    threshold = draw(st.sampled_from([0.05, 0.3, 0.8, 0.95, 1.0]))
    temperature = draw(st.sampled_from([0.0, 0.0, 0.7, 1.5]))
    return logits, canvas, step, steps, threshold, temperature, seed


@settings(max_examples=200, deadline=None)
@given(_cases())
def test_commit_rule_properties(case) -> None:
    logits, canvas, step, steps, threshold, temperature, seed = case
    res = _run(
        logits,
        canvas,
        threshold=threshold,
        step=step,
        steps=steps,
        temperature=temperature,
        seed=seed,
    )
    masked = canvas == MASK
    n = masked.sum(-1)
    newly = masked & (res.canvas != MASK)
    # decided tokens never change; undecided ones either stay masked or get a non-mask token
    assert torch.equal(res.canvas[~masked], canvas[~masked])
    assert not (res.canvas[masked & ~newly] != MASK).any()
    assert torch.equal(newly.sum(-1), res.num_committed)
    assert (res.canvas != MASK).sum() >= (canvas != MASK).sum()
    for row in range(canvas.shape[0]):
        k, nr = int(res.num_committed[row]), int(n[row])
        if nr == 0:
            assert k == 0
            continue
        if step == steps - 1:
            assert k == nr  # the last step decides everything left
            continue
        conf = res.confidence[row][masked[row]]
        confident = int((conf > threshold).sum())
        assert k >= 1
        assert k >= math.ceil(nr / (steps - step))
        assert k == min(nr, max(confident, 1, math.ceil(nr / (steps - step))))
        # the decided positions are the most confident ones
        chosen = res.confidence[row][newly[row]]
        rest = res.confidence[row][masked[row] & ~newly[row]]
        if len(rest) and len(chosen):
            assert chosen.min() >= rest.max()
    # decided positions report +inf confidence; the mask id is never predicted
    assert torch.isinf(res.confidence[~masked]).all()
    assert not (res.canvas == MASK).logical_and(newly).any()


def test_mask_token_is_never_predicted_even_when_it_has_the_top_logit() -> None:
    logits = torch.zeros(1, 4, 8)
    logits[..., MASK] = 100.0
    logits[..., 5] = 1.0
    res = _run(logits, torch.full((1, 4), MASK), step=15)
    assert (res.canvas == 5).all()
    # confidence is renormalised without the mask id: e / (e + 6)
    torch.testing.assert_close(res.confidence, torch.full((1, 4), math.e / (math.e + 6)))


def test_threshold_is_strict() -> None:
    logits = torch.full((1, 4, 6), -1e9)
    logits[..., 4] = 0.0
    logits[..., 5] = 0.0  # two equal tokens: confidence exactly 0.5 everywhere
    res = _run(logits, torch.full((1, 4), MASK), threshold=0.5, steps=4)
    assert int(res.num_committed[0]) == 1  # nothing beats 0.5 strictly: only the minimum one
    res = _run(logits, torch.full((1, 4), MASK), threshold=0.49, steps=4)
    assert int(res.num_committed[0]) == 4


def test_ties_go_to_lower_positions() -> None:
    logits = torch.zeros(1, 6, 8)
    logits[..., 5] = 2.0  # identical rows: identical confidences
    canvas = torch.full((1, 6), MASK)
    canvas[0, 1] = 7
    res = _run(logits, canvas, threshold=0.99, step=0, steps=3)  # ceil(5 / 3) = 2
    assert res.canvas[0].tolist() == [5, 7, 5, MASK, MASK, MASK]


def test_ceil_floor_finishes_the_block_in_time() -> None:
    g = torch.Generator().manual_seed(0)
    canvas = torch.full((2, 16), MASK)
    for step in range(5):
        logits = torch.randn(2, 16, 32, generator=g) * 0.1  # never confident
        res = _run(logits, canvas, threshold=0.99, step=step, steps=5)
        canvas = res.canvas
        assert res.num_committed.tolist() == [[4, 3, 3, 3, 3][step]] * 2
    assert not (canvas == MASK).any()


def test_sampling_confidence_is_untempered_and_seeded() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 16, 50, generator=g)
    a = _run(logits, torch.full((1, 16), MASK), temperature=2.0, seed=11, step=15)
    b = _run(logits, torch.full((1, 16), MASK), temperature=2.0, seed=11, step=15)
    c = _run(logits, torch.full((1, 16), MASK), temperature=2.0, seed=12, step=15)
    assert torch.equal(a.canvas, b.canvas)
    assert not torch.equal(a.canvas, c.canvas)
    probs = torch.softmax(
        torch.cat([logits[..., :MASK], torch.full((1, 16, 1), -1e30), logits[..., MASK + 1 :]], -1),
        -1,
    )
    expected = probs.gather(-1, a.canvas.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(a.confidence, expected)
    # the noise depends on the absolute position: another block start draws differently
    d = _run(logits, torch.full((1, 16), MASK), temperature=2.0, seed=11, step=15, start=16)
    assert not torch.equal(a.canvas, d.canvas)


def _vllm_kept(logits: torch.Tensor, temperature: float, top_k, top_p, min_p) -> torch.Tensor:
    """The tokens vLLM's sampler may draw: temperature, its min_p processor, top-k / top-p."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    tempered = logits.double() / temperature
    # vllm/v1/sample/logits_processor/builtin.py: MinPLogitsProcessor.apply
    probs = torch.softmax(tempered, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(-1)
    tempered = tempered.masked_fill(probs < threshold, float("-inf"))
    kept = apply_top_k_top_p_pytorch(tempered.clone(), top_k, top_p)
    return torch.isfinite(kept)


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    vocab=st.integers(2, 300),
    temperature=st.sampled_from([0.3, 1.0, 2.0]),
)
def test_filters_keep_what_vllm_keeps(seed: int, vocab: int, temperature: float) -> None:
    """min_p, then top_k, then top_p, as vLLM applies them (tie-free logits, where vLLM's sort
    order cannot matter): the cutoff keeps exactly vLLM's tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = 6
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64).float() * 3
    top_k = torch.randint(1, vocab + 1, (rows,), generator=g)
    top_p = torch.rand(rows, generator=g, dtype=torch.float64) * 0.9 + 0.1
    min_p = torch.rand(rows, generator=g, dtype=torch.float64) * 0.3
    top_k[0], top_p[1], min_p[2] = vocab, 1.0, 0.0  # each filter off in some row
    filters = SamplingFilters(top_k, top_p, min_p)
    temps = torch.full((rows,), temperature)  # float32, as the engine keeps it
    temperature = float(temps[0])
    cutoff = sampling_cutoff(logits, mask_id=None, temperature=temps, filters=filters)
    ours = logits.double() / temperature >= cutoff.unsqueeze(-1)
    assert torch.equal(ours, _vllm_kept(logits, temperature, top_k, top_p, min_p))


def test_filters_ignored_under_greedy_and_drawn_tokens_are_kept() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 16, 50, generator=g) * 2
    canvas = torch.full((1, 16), MASK)
    filters = SamplingFilters(
        torch.tensor([3]), torch.tensor([0.5], dtype=torch.float64), torch.zeros(1).double()
    )
    greedy = _run(logits, canvas, step=15)
    assert torch.equal(_run(logits, canvas, step=15, filters=filters).canvas, greedy.canvas)
    for seed in range(20):
        drawn = _run(logits, canvas, step=15, temperature=1.5, seed=seed, filters=filters).canvas
        temps = torch.full((1, 16), 1.5)
        cutoff = sampling_cutoff(
            logits, mask_id=MASK, temperature=temps, filters=filters.expand(canvas.shape)
        )
        chosen = logits.gather(-1, drawn.unsqueeze(-1)).squeeze(-1).double() / 1.5
        assert bool((chosen >= cutoff).all())
        top3 = logits.masked_fill(torch.arange(50) == MASK, float("-inf")).topk(3).indices
        assert bool((drawn.unsqueeze(-1) == top3).any(-1).all())


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31), vocab=st.integers(2, 300))
def test_logprobs_modes_are_vllms(seed: int, vocab: int) -> None:
    """Each ``--logprobs-mode`` reports what vLLM's sampler reports for a mixed batch of
    greedy and sampled rows (``vllm/v1/sample/sampler.py``): the raw logits or their
    ``compute_logprobs``; the adjusted logits after ``apply_temperature`` (greedy rows divided
    by 1), the min-p processor and ``apply_top_k_top_p`` (what vLLM's sampler keeps,
    ``_vllm_kept``), or their log-softmax."""
    from vllm.v1.sample.sampler import Sampler

    g = torch.Generator().manual_seed(seed)
    rows = 6
    raw = torch.randn(rows, vocab, generator=g, dtype=torch.float64).float() * 3
    adjusted = raw + torch.randn(rows, vocab, generator=g)  # e.g. a bias
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.6, 0.0, 2.0])
    filters = SamplingFilters(
        torch.randint(0, vocab + 1, (rows,), generator=g),
        torch.rand(rows, generator=g, dtype=torch.float64) * 0.9 + 0.1,
        torch.rand(rows, generator=g, dtype=torch.float64) * 0.3,
    )
    vllm_temperature = torch.where(temperature > 0, temperature, 1.0)
    processed = Sampler.apply_temperature(adjusted.clone(), vllm_temperature, all_random=False)
    for r in range(rows):
        if temperature[r] > 0:
            top_k = filters.top_k[r : r + 1].clamp(min=1) if filters.top_k[r] else None
            kept = _vllm_kept(
                adjusted[r : r + 1],
                float(temperature[r]),
                top_k if top_k is not None else torch.tensor([vocab]),
                filters.top_p[r : r + 1],
                filters.min_p[r : r + 1],
            )
            processed[r] = processed[r].masked_fill(~kept[0], float("-inf"))
    expected = {
        "raw_logits": raw,
        "raw_logprobs": Sampler.compute_logprobs(raw),
        "processed_logits": processed,
        "processed_logprobs": Sampler.compute_logprobs(processed),
    }
    assert set(expected) == set(LOGPROBS_MODES)
    for mode, values in expected.items():
        ours = reported_logprobs(
            raw,
            mask_id=None,
            logprobs_mode=mode,
            adjusted=adjusted,
            temperature=temperature,
            filters=filters,
        )
        assert torch.equal(ours, values), mode

"""The load-aware decoding policy (``engine/load_policy.py``) without an engine."""

from __future__ import annotations

import itertools

import pytest
import torch

from vllm_twotower.engine.load_policy import (
    PRIOR,
    Candidate,
    StepCostModel,
    StepWork,
    choose_multi_token,
)

TRUE = (0.02, 0.0005, 0.003, 0.0002)


def _steps(n: int, seed: int = 0) -> list[StepWork]:
    g = torch.Generator().manual_seed(seed)
    return [
        StepWork(float(c), float(p), float(p * w))
        for c, p, w in zip(
            torch.randint(1, 300, (n,), generator=g).tolist(),
            torch.randint(0, 5, (n,), generator=g).tolist(),
            torch.randint(1, 200, (n,), generator=g).tolist(),
            strict=True,
        )
    ]


def test_the_cost_model_learns_the_step_time_and_follows_a_change() -> None:
    model = StepCostModel()
    assert model.estimates() == dict(zip(model.estimates(), PRIOR, strict=True))
    truth = StepCostModel(TRUE)
    noise = torch.Generator().manual_seed(1)
    for work in _steps(400):
        model.observe(
            work, truth.seconds(work) * (1 + 0.05 * float(torch.randn(1, generator=noise)))
        )
    assert list(model.estimates().values()) == pytest.approx(TRUE, rel=0.2)
    # The machine gets twice as slow: the forgetting factor follows within a few hundred steps.
    slower = StepCostModel(tuple(2 * t for t in TRUE))
    for work in _steps(400, seed=2):
        model.observe(work, slower.seconds(work))
    assert list(model.estimates().values()) == pytest.approx([2 * t for t in TRUE], rel=0.2)


def test_unexcited_directions_do_not_wind_up() -> None:
    """Hundreds of steps without any denoiser work (a busy all-AR server), then one noisy
    step with some: the denoiser coefficients move by a bounded amount, not wildly."""
    model = StepCostModel()
    truth = StepCostModel(TRUE)
    for work in _steps(600):
        ar_only = StepWork(work.context_positions, 0.0, 0.0)
        model.observe(ar_only, truth.seconds(ar_only))
    before = model.estimates()
    model.observe(StepWork(50, 2, 64), 10 * truth.seconds(StepWork(50, 2, 64)))
    after = model.estimates()
    assert after["denoiser_position_s"] < 50 * max(before["denoiser_position_s"], PRIOR[3])


def test_fixed_coefficients_ignore_timings() -> None:
    model = StepCostModel(TRUE)
    model.observe(StepWork(10, 1, 16), 5.0)
    assert list(model.estimates().values()) == list(TRUE)
    with pytest.raises(ValueError, match="auto_cost_model"):
        StepCostModel((1.0, -1.0, 0.0, 0.0))


@pytest.mark.parametrize("seed", range(20))
def test_the_greedy_choice_is_the_best_subset(seed: int) -> None:
    """Against brute force over every subset, with random candidates and fixed load."""
    g = torch.Generator().manual_seed(seed)
    model = StepCostModel(tuple(float(x) for x in torch.rand(4, generator=g) * 0.01))
    candidates = [
        Candidate(float(t), float(p), 16, float(t))
        for t, p in zip(
            torch.randint(1, 17, (6,), generator=g).tolist(),
            torch.randint(1, 4, (6,), generator=g).tolist(),
            strict=True,
        )
    ]
    fixed = StepWork(float(torch.randint(0, 100, (1,), generator=g)), 0.0, 0.0)

    def throughput(chosen) -> float:
        tokens = sum(c.tokens if x else 1 for c, x in zip(candidates, chosen, strict=True))
        work = StepWork(
            fixed.context_positions
            + sum(c.context if x else 1 for c, x in zip(candidates, chosen, strict=True)),
            max([0.0] + [c.passes for c, x in zip(candidates, chosen, strict=True) if x]),
            sum(c.passes * c.width for c, x in zip(candidates, chosen, strict=True) if x),
        )
        return tokens / model.seconds(work)

    best = max(throughput(s) for s in itertools.product([False, True], repeat=6))
    greedy = throughput(choose_multi_token(model, candidates, 0.0, fixed))
    assert greedy >= 0.99 * best


def test_a_shared_pass_cost_is_paid_when_many_rows_share_it() -> None:
    """Beside thirty AR rows, one block does not pay its passes; thirty-one blocks together do
    (what a first greedy version missed: the ratio is not unimodal along the candidates)."""
    model = StepCostModel((0.01, 0.0001, 0.005, 0.0001))
    block = Candidate(tokens=16, passes=2, width=16, context=16)
    assert choose_multi_token(model, [block], 30, StepWork(30, 0, 0)) == [False]
    assert choose_multi_token(model, [block] * 31, 0, StepWork(0, 0, 0)) == [True] * 31

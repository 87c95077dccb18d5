"""The load-aware decoding policy (``engine/load_policy.py``) without an engine."""

from __future__ import annotations

import itertools

import pytest
import torch

from vllm import SamplingParams

from vllm_twotower import vllm_internals as vi
from vllm_twotower.config import DiffusionDefaults
from vllm_twotower.engine.load_policy import (
    PRIOR,
    RIDGE,
    Candidate,
    RunningAverage,
    StepCostModel,
    StepWork,
    choose_multi_token,
)
from vllm_twotower.engine.params import ServerDefaults
from vllm_twotower.engine.requests import RequestTable
from vllm_twotower.engine.step_planner import PRIOR_PASSES, StepPlanner

TRUE = (0.02, 0.0005, 0.003, 0.0002)


def _noisy(seconds: float, noise: torch.Generator) -> float:
    return seconds * (1 + 0.05 * float(torch.randn(1, generator=noise)))


def _observe_steps(model: StepCostModel, truth: StepCostModel, n: int, seed: int) -> None:
    """``n`` steps of random context positions, each with 0–4 passes of random widths."""
    g = torch.Generator().manual_seed(seed)
    a, b_c, e, b_d = truth.coefficients().tolist()
    for _ in range(n):
        for _ in range(int(torch.randint(0, 5, (1,), generator=g))):
            positions = float(torch.randint(1, 300, (1,), generator=g))
            model.observe_pass(positions, _noisy(e + b_d * positions, g))
        context = float(torch.randint(1, 300, (1,), generator=g))
        model.observe_step(context, _noisy(a + b_c * context, g))


def test_the_cost_model_learns_the_step_time_and_follows_a_change() -> None:
    model = StepCostModel()
    assert model.estimates() == dict(zip(model.estimates(), PRIOR, strict=True))
    _observe_steps(model, StepCostModel(TRUE), 400, seed=0)
    assert list(model.estimates().values()) == pytest.approx(TRUE, rel=0.2)
    # The machine gets twice as slow: the forgetting factor follows within a few hundred steps.
    _observe_steps(model, StepCostModel(tuple(2 * t for t in TRUE)), 400, seed=2)
    assert list(model.estimates().values()) == pytest.approx([2 * t for t in TRUE], rel=0.2)


def test_a_batch_of_blocks_and_its_stragglers_separate_the_pass_terms() -> None:
    """What one fit of whole steps got wrong (batch 64 of short answers): every step with
    denoiser work is one pass over the whole batch's blocks plus one over the few stragglers'
    — a fixed shape, so that fit put the whole pass into the per-pass term and judged extra
    blocks free.  Timed one by one, the passes separate the two terms."""
    model = StepCostModel()
    e, b_d = TRUE[2], TRUE[3]
    noise = torch.Generator().manual_seed(3)
    for _ in range(200):
        for positions in (64 * 16, 9 * 16):
            model.observe_pass(positions, _noisy(e + b_d * positions, noise))
    estimates = model.estimates()
    assert estimates["denoiser_pass_s"] == pytest.approx(e, rel=0.3)
    assert estimates["denoiser_position_s"] == pytest.approx(b_d, rel=0.1)


def test_unexcited_directions_do_not_wind_up() -> None:
    """Hundreds of steps without any denoiser pass (a busy all-AR server), then one noisy
    pass: the pass terms move by a bounded amount, not wildly."""
    model = StepCostModel()
    truth = StepCostModel(TRUE)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        context = float(torch.randint(1, 300, (1,), generator=g))
        model.observe_step(context, truth.seconds(StepWork(context, 0.0, 0.0)))
    before = model.estimates()
    model.observe_pass(64, 10 * (TRUE[2] + TRUE[3] * 64))
    after = model.estimates()
    assert after["denoiser_position_s"] < 50 * max(before["denoiser_position_s"], PRIOR[3])
    assert after["overhead_s"] == before["overhead_s"]


def test_fixed_coefficients_ignore_timings() -> None:
    model = StepCostModel(TRUE)
    model.observe_step(10, 5.0)
    model.observe_pass(16, 5.0)
    model.observe_gap(5.0)
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


def test_a_block_is_valued_at_what_it_emits_up_to_eos() -> None:
    """Short answers end inside their first block: the planner learns what blocks (and
    drafts) emit up to and including their first EOS, at most the rows' remaining
    ``max_tokens``; before any, and as observations fade, a block is worth its width."""
    planner = StepPlanner(ServerDefaults(DiffusionDefaults(), 16), eos_token_ids=[2])
    assert planner.block_yield.value == planner.draft_yield.value == 16
    tokens = torch.tensor([[5, 6, 2, 7, 2, -1], [5, 6, 7, 8, 9, 4], [2, 3, 3, 3, 3, 3]])
    planner.observe_yields(tokens, torch.tensor([100, 4, 100]), torch.tensor([0, 1, 2]), [])
    emitted = 3 + 4 + 1  # to the first EOS; max_tokens; the EOS alone
    assert planner.block_yield.value == pytest.approx((emitted + RIDGE * 16) / (3 + RIDGE))
    assert planner.draft_yield.value == 16
    planner.observe_yields(tokens[:1], torch.tensor([100]), [], torch.tensor([0]))
    assert planner.draft_yield.value == pytest.approx((3 + RIDGE * 16) / (1 + RIDGE))
    for _ in range(2000):  # steps without a block: the prior comes back
        planner.observe_yields(tokens[:0], torch.tensor([]), [], [])
    assert planner.block_yield.value == pytest.approx(16, rel=1e-3)


def test_an_unlucky_first_block_is_tried_again() -> None:
    """A yield average made too low by one early block recovers as soon as blocks are tried,
    and they are tried because the prior still weighs in."""
    average = RunningAverage(prior=16)
    average.step(torch.tensor([1.0]))
    assert average.value > 5  # still worth a try where a block of ~5 tokens pays
    for _ in range(300):
        average.step(torch.full((8,), 5.0))
    assert average.value == pytest.approx(5, rel=0.01)


def test_fresh_requests_take_the_engines_passes_per_block() -> None:
    """A request that has run no block yet is valued at the engine's recent passes per block
    (blocks of earlier requests), not at the prior: a wave of fresh requests is otherwise
    judged at two passes where blocks take one."""
    planner = StepPlanner(ServerDefaults(DiffusionDefaults(), 16), eos_token_ids=[2])
    assert planner.block_passes.value == PRIOR_PASSES
    for _ in range(50):
        planner.observe_passes(torch.ones(8, dtype=torch.long), drafts=False)
        planner.observe_yields(torch.zeros(0, 16), torch.zeros(0), [], [])
    assert planner.block_passes.value == pytest.approx(1.0, abs=0.01)
    assert planner.draft_passes.value == 1.0  # the prior: no draft seen


def _plan_on_the_grid(
    own_passes: list[int], engine_passes: float, cost: tuple[float, ...]
) -> list[bool]:
    """The plan for ``auto`` rows on their block grid (two blocks into their answers) whose
    blocks took ``own_passes`` each, in an engine whose recent blocks took ``engine_passes``."""
    defaults = ServerDefaults(DiffusionDefaults(), 16, cost_model=cost)
    table, planner = RequestTable(defaults), StepPlanner(defaults, eos_token_ids=[2])
    for _ in range(1000):  # the engine's recent blocks
        planner.observe_passes(torch.tensor([engine_passes]), drafts=False)
        planner.observe_yields(torch.zeros(0, 16), torch.zeros(0), [], [])
    n = len(own_passes)
    params = SamplingParams(max_tokens=200, extra_args={"mode": "auto"})
    slots = table.slots([f"r{i}" for i in range(n)], [params] * n)
    table.blocks[slots] = 2
    table.nfe[slots] = 2 * torch.tensor(own_passes)
    live = torch.ones(n, dtype=torch.bool)
    return planner.plan(table, slots, live, torch.full((n,), 32), torch.ones(n)).tolist()


def test_a_slow_row_is_not_left_behind_by_its_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the grid, AR is a commitment to a block's worth of AR steps: a row whose blocks need
    more passes than the engine's are valued at the engine's, so it takes blocks with its
    batch instead of trailing it (valued at its own 13 passes, it went AR here, and on the long
    workload at batch 8 such rows made ``auto`` 0.84× AR where ``mask_diffusion`` ran 1.12×);
    a row that needs fewer passes is valued at its own, and takes a block where the others
    are too costly."""
    monkeypatch.setattr(vi, "broadcast_from_first_tp_rank", lambda obj: obj)
    light = (0.02, 0.0001, 0.001, 0.00005)
    assert _plan_on_the_grid([2] * 4 + [13] * 4, 5.0, light) == [True] * 8
    heavy = (0.01, 0.0001, 0.003, 0.0001)
    assert _plan_on_the_grid([1] * 8 + [5] * 40, 5.0, heavy) == [True] * 8 + [False] * 40

"""The runner's side of load-aware decoding (issue #24, :mod:`.load_policy` has the policy).

Each step the runner asks :meth:`StepPlanner.plan` which ``auto`` rows denoise a block and which
``speculative`` rows draft (the others emit one AR token), times each pass of the denoising
loop and of a verification (:meth:`StepPlanner.timed_pass`), reports the tokens each block or
draft emitted up to its first EOS (:meth:`StepPlanner.observe_yields`), and
:meth:`StepPlanner.end_step` times the rest of the step, and the gap since the previous step
(the scheduler's share), to teach the cost model.  Every per-request input of the plan is a
slot tensor of the request table (a request's running passes per block, accepted guesses per
draft, remaining ``max_tokens``), so requests carry no Python state.  Under tensor parallelism
every rank samples its own tokens, so all ranks must take the same steps: the first rank's plan
is broadcast (its timings are the ones learned from).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from vllm_twotower import vllm_internals as vi
from vllm_twotower.engine.load_policy import (
    Candidates,
    RunningAverage,
    StepCostModel,
    StepWork,
    choose_multi_token,
)
from vllm_twotower.engine.params import ServerDefaults
from vllm_twotower.engine.requests import MODE_ID, RequestTable

AR, MASK_DIFFUSION, MOCK_AR = MODE_ID["ar"], MODE_ID["mask_diffusion"], MODE_ID["mock_ar"]
SPECULATIVE, AUTO = MODE_ID["speculative"], MODE_ID["auto"]
#: Before any block has run: passes per block.  Optimistic on purpose, as is the prior of
#: accepted guesses per draft (half the draft): a request tries its multi-token step, and the
#: running averages decide after that.
PRIOR_PASSES = 2.0


def _per_row_mean(
    total: torch.Tensor, count: torch.Tensor, otherwise: torch.Tensor | float
) -> torch.Tensor:
    """Each row's ``total / count``; rows with no count yet take ``otherwise``."""
    mean = total.double() / count.clamp(min=1).double()
    return torch.where(count > 0, mean, torch.as_tensor(otherwise, dtype=torch.float64))


class StepPlanner:
    """Plans, counts and times the engine steps of one model runner."""

    def __init__(self, defaults: ServerDefaults, eos_token_ids: Sequence[int]) -> None:
        self.enabled = defaults.load_aware
        self.model = StepCostModel(defaults.cost_model)
        self._eos = torch.tensor(list(eos_token_ids), dtype=torch.long)
        #: tokens a block / a draft step emits up to its first EOS: a short answer ends inside
        #: its first block, so the block's width would overvalue it
        self.block_yield = RunningAverage(defaults.max_block_size)
        self.draft_yield = RunningAverage(defaults.max_block_size)
        #: denoiser passes per block / per draft, for requests that have run none yet
        self.block_passes = RunningAverage(PRIOR_PASSES)
        self.draft_passes = RunningAverage(1.0)
        self._passes_seen: dict[bool, list[torch.Tensor]] = {False: [], True: []}
        self._started = 0.0
        self._scheduled = 0
        self._pass_seconds = 0.0
        #: the previous step's requests and when its worker part ended
        self._previous: tuple[set[str], float] | None = None
        self._gap: float | None = None

    def start_step(self, scheduled_tokens: int) -> None:
        """A step starts (``execute_model``)."""
        now = time.perf_counter()
        self._gap = now - self._previous[1] if self._previous is not None else None
        self._started = now
        self._scheduled = scheduled_tokens
        self._pass_seconds = 0.0

    @contextmanager
    def timed_pass(self, positions: int) -> Iterator[None]:
        """Time one denoiser or verification pass over ``positions`` (the body of the ``with``,
        which must end on the host: the loops read each pass's commits back)."""
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self._pass_seconds += seconds
        self.model.observe_pass(positions, seconds)

    def observe_passes(self, passes: torch.Tensor, *, drafts: bool) -> None:
        """The denoiser passes each of this step's blocks (or drafts, if ``drafts``) took."""
        self._passes_seen[drafts].append(passes.cpu())

    def observe_yields(
        self, tokens: torch.Tensor, left: torch.Tensor, blocks: torch.Tensor, drafts: torch.Tensor
    ) -> None:
        """What this step's blocks (rows ``blocks``) and draft steps (rows ``drafts``) emitted:
        their tokens (``tokens [num_reqs, width]``, -1 padded) up to and including the first
        EOS, at most the row's remaining ``max_tokens`` (``left [num_reqs]``); and the passes
        :meth:`observe_passes` reported.  Once per step: the averages fade per step."""
        valid = tokens >= 0
        eos = torch.isin(tokens.long(), self._eos).int()
        before_first_eos = eos.cumsum(dim=1) - eos == 0
        emitted = (valid & before_first_eos).sum(dim=1).minimum(left)
        self.block_yield.step(emitted[blocks])
        self.draft_yield.step(emitted[drafts])
        for drafted, average in ((False, self.block_passes), (True, self.draft_passes)):
            seen = self._passes_seen[drafted]
            average.step(torch.cat(seen) if seen else torch.zeros(0))
            seen.clear()

    def end_step(self, request_ids: list[str]) -> None:
        """The step's tokens are chosen: learn from its worker time and the gap before it.

        A step costs more than the worker's part of it: the scheduler, the output processing
        and the transfers between processes run between two ``execute_model`` calls, per step
        whatever its size, which is what favours multi-token steps at low load.  The worker
        part outside the timed passes is learned every step; the gap before it only when this
        step shares a request with the previous one (the engine was busy in between, not
        waiting for a request).
        """
        ids = set(request_ids)
        if self._previous is not None and self._gap is not None and ids & self._previous[0]:
            self.model.observe_gap(self._gap)
        now = time.perf_counter()
        self.model.observe_step(self._scheduled, now - self._started - self._pass_seconds)
        self._previous = (ids, now)

    def plan(
        self,
        table: RequestTable,
        slots: torch.Tensor,
        live: torch.Tensor,
        output_len: torch.Tensor,
        scheduled: torch.Tensor,
    ) -> torch.Tensor:
        """Bool ``[num_reqs]``: the rows that take their multi-token step (a block for ``auto``,
        a draft for ``speculative``); only live ``speculative`` rows and live ``auto`` rows on
        their block grid (a whole number of blocks after the prompt) are ever true.

        ``output_len`` and ``scheduled`` are each row's output length and this step's scheduled
        tokens."""
        mode, block_size = table.mode[slots], table.block_size[slots]
        # An auto row may start a block only on its block grid, where mask_diffusion's blocks
        # start (the reference's ``_check_on_grid`` says why); off it, it takes AR tokens.
        auto = live & (mode == AUTO) & (output_len % block_size == 0)
        speculative = live & (mode == SPECULATIVE)
        if not self.enabled:  # fixed schedule: speculative always drafts (auto is refused)
            return speculative
        rows = torch.nonzero(auto | speculative).flatten()
        if not rows.numel():
            return torch.zeros_like(live)
        block = block_size.double()
        left = (table.max_tokens[slots] - output_len).double()
        blocks, nfe = table.blocks[slots], table.nfe[slots]
        passes = _per_row_mean(nfe, blocks, self.block_passes.value)
        draft_passes = _per_row_mean(nfe, blocks, self.draft_passes.value)
        accepted = _per_row_mean(table.accepted[slots], blocks, (block - 1) / 2)
        # A block commits up to its size, a draft c, its accepted guesses and one AR token;
        # neither past the request's max_tokens, nor past the EOS blocks and drafts have
        # reached on average.
        block_tokens = block.minimum(left).clamp(max=self.block_yield.value)
        draft_tokens = (accepted + 2).minimum(left).clamp(max=self.draft_yield.value)
        one_token = live & ((mode == AR) | (mode == MOCK_AR) | ((mode == AUTO) & ~auto))
        blocks_now = live & (mode == MASK_DIFFUSION)
        fixed = StepWork(
            float(one_token.sum() + block_tokens[blocks_now].sum() + scheduled[~live].sum()),
            float(passes[blocks_now].max()) if bool(blocks_now.any()) else 0.0,
            float((passes * block)[blocks_now].sum() + (live & (mode == MOCK_AR)).sum()),
        )
        fixed_tokens = float(one_token.sum() + block_tokens[blocks_now].sum())
        # auto rows denoise a block; speculative ones draft, and the context tower verifies
        # the draft before consuming what it emits.
        # An auto row's block is valued at its own passes per block only where they are
        # fewer than the engine's recent average: on the grid, taking AR commits a row to a
        # block's worth of AR steps, so a row valued at its own (many) passes went AR while
        # its batch ran blocks, and then trailed the batch (engine-design §14); a row ahead
        # of its batch costs nothing later.
        is_auto = auto[rows]
        block_passes = passes.clamp(max=self.block_passes.value)
        candidates = Candidates(
            tokens=torch.where(is_auto, block_tokens[rows], draft_tokens[rows]),
            passes=torch.where(is_auto, block_passes[rows], draft_passes[rows] + 1),
            width=block[rows],
            context=torch.where(is_auto, block_tokens[rows], draft_tokens[rows]),
        )
        chosen = choose_multi_token(self.model, candidates, fixed_tokens, fixed)
        chosen = vi.broadcast_from_first_tp_rank(chosen)
        multi = torch.zeros_like(live)
        multi[rows] = torch.tensor(chosen, dtype=torch.bool)
        return multi


def engine_stats(
    table: RequestTable,
    planner: StepPlanner,
    request_id: str | None = None,
    include_requests: bool = True,
) -> dict[str, object]:
    """The worker's ``twotower_stats``: the request table's counters
    (:meth:`RequestTable.stats`), the cost model's current estimates, in seconds, as
    ``step_cost_<term>`` aggregate keys, and the tokens a block / a draft step is expected to
    emit, all of which ``/metrics`` exports."""
    stats = table.stats(request_id, include_requests)
    aggregate = stats["aggregate"]
    assert isinstance(aggregate, dict)
    for term, seconds in planner.model.estimates().items():
        aggregate[f"step_cost_{term}"] = seconds
    aggregate["expected_tokens_per_block"] = planner.block_yield.value
    aggregate["expected_tokens_per_draft"] = planner.draft_yield.value
    return stats

"""Load-aware decoding (issue #24): which requests take a multi-token step in this engine step.

A diffusion block commits ``k`` tokens (up to a block) for ``p`` denoiser passes over the
block's ``w`` positions, and the next step's context pass then consumes the ``w`` positions; an
AR token commits one token for one context position.  When a step is bound by its fixed cost
(little load: the scheduler, the launches, reading the weights) the block wins by ``k``; when it
is bound by the positions it computes (heavy load), one position per token wins.  Only the
engine knows where it stands, so each step it decides, for each ``auto`` request (a diffusion
block or an AR token) and each ``speculative`` one (a draft, or just the AR token ``c``: the
output is ``ar``'s either way), whichever maximises the batch's committed tokens per second.
An ``auto`` request is a candidate for a block only on its block grid
(:meth:`~vllm_twotower.engine.step_planner.StepPlanner.plan`); off it, it takes AR tokens.

**Cost model** (:class:`StepCostModel`).  The time of an engine step is modelled as
``a + b_c·C + e·P + b_d·D``: a fixed cost ``a`` (the worker's, plus the moving average of the
gap between two steps of a busy engine: the scheduler, output processing, transfers), ``b_c``
per context-tower position ``C`` (the scheduled tokens), ``e`` per pass ``P`` of the denoising
loop or of a speculative verification (launches, Python, the commit rule) and ``b_d`` per
position ``D`` such a pass computes.  Two fits learn it from live timings (exponentially
weighted least squares, so they follow a machine whose load changes, each with a ridge towards
a prior for directions the recent steps do not excite): ``(e, b_d)`` from every pass timed on
its own, ``(a, b_c)`` from the rest of each step.  One fit of the whole step over the four
terms cannot tell ``e`` from ``b_d``: the steps with denoiser work come in a few fixed shapes
(a batch of blocks, then its stragglers), so the fit put the whole pass into ``e`` and judged
extra blocks free; single passes range from one row to the whole batch.
``--hf-overrides '{"auto_cost_model": [a, b_c, e, b_d]}'`` fixes the coefficients instead:
decisions then depend on the requests only (tests, reproducible benchmarks), never on timing.

**Decision** (:func:`choose_multi_token`).  The step's throughput with the set ``S`` of requests
that take their multi-token step is ``N(S) / T(S)``: tokens committed over modelled time, the
other requests' (fixed) share included.  For a ratio of sums with per-row costs, the best ``S``
is a prefix of the candidates ordered by extra tokens per extra second (Dinkelbach's
argument); the per-pass cost is shared by all the rows that denoise, so the ratio is not
unimodal along that order (one block alone may not pay its passes where thirty do), and every
prefix is evaluated (``O(n)`` with running sums), the best taken.  A request's ``p`` is its
own running passes per draft (per block, but never more than the engine's recent average:
:meth:`~vllm_twotower.engine.step_planner.StepPlanner.plan` says why) if it has run one, else
the engine's recent average (:class:`RunningAverage`); its ``k`` is bounded by what recent
blocks (drafts) emitted up to EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: The cost model's terms, in the order of its coefficient vector.
TERMS = ("overhead_s", "context_position_s", "denoiser_pass_s", "denoiser_position_s")
#: Where the learning starts (seconds): a small CPU model's magnitudes; a few steps move it.
PRIOR = (5e-3, 2e-4, 2e-3, 2e-4)
#: Forgetting factor of the weighted least squares: ~100 observations of memory.
FORGETTING = 0.99
#: How many observations' worth the prior weighs in each fit.
RIDGE = 1.0
#: Typical positions of a step (or a pass): the fits run in features scaled by it, so that the
#: ridge weighs both of a fit's terms alike.
POSITION_SCALE = 100.0


@dataclass(frozen=True)
class StepWork:
    """What one engine step computes: the cost model's inputs."""

    context_positions: float
    denoiser_passes: float
    denoiser_positions: float

    def features(self) -> torch.Tensor:
        return torch.tensor(
            [1.0, self.context_positions, self.denoiser_passes, self.denoiser_positions],
            dtype=torch.float64,
        )


class _AffineFit:
    """``seconds ≈ fixed + per_position · positions``, exponentially weighted least squares
    with a ridge towards a prior.

    In features scaled to ~1 (:data:`POSITION_SCALE`), the prior weighs as much as one
    observation (:data:`RIDGE`): it decides only where the recent observations say nothing, so
    a direction they stop exciting drifts back to the prior instead of winding up, and one odd
    observation cannot swing it far."""

    def __init__(self, prior: Sequence[float]) -> None:
        self._scale = torch.tensor([1.0, POSITION_SCALE], dtype=torch.float64)
        self._prior = torch.tensor(prior, dtype=torch.float64) * self._scale
        self._xx = torch.zeros(2, 2, dtype=torch.float64)
        self._xy = torch.zeros(2, dtype=torch.float64)
        self.theta = torch.tensor(prior, dtype=torch.float64)

    def observe(self, positions: float, seconds: float) -> None:
        x = torch.tensor([1.0, positions], dtype=torch.float64) / self._scale
        self._xx = FORGETTING * self._xx + torch.outer(x, x)
        self._xy = FORGETTING * self._xy + x * seconds
        ridge = RIDGE * torch.eye(2, dtype=torch.float64)
        self.theta = torch.linalg.solve(self._xx + ridge, self._xy + RIDGE * self._prior)
        self.theta = self.theta / self._scale


class StepCostModel:
    """Seconds of an engine step as a linear function of its :class:`StepWork`."""

    def __init__(self, fixed: Sequence[float] | None = None) -> None:
        """Learn from :meth:`observe_step` and :meth:`observe_pass`, or, given ``fixed``
        coefficients, keep them."""
        self.learning = fixed is None
        self._fixed = torch.tensor(PRIOR if fixed is None else fixed, dtype=torch.float64)
        if self._fixed.shape != (len(TERMS),) or bool((self._fixed < 0).any()):
            raise ValueError(f"auto_cost_model must be {len(TERMS)} non-negative seconds {TERMS}")
        self._step = _AffineFit(PRIOR[:2])  # (a, b_c): a step outside its passes
        self._pass = _AffineFit(PRIOR[2:])  # (e, b_d): one pass
        #: seconds between two steps of a busy engine, outside the worker (moving average)
        self.gap = 0.0
        self.observed = 0

    def observe_pass(self, positions: float, seconds: float) -> None:
        """One denoiser (or verification) pass over ``positions`` took ``seconds``; no-op for
        fixed coefficients."""
        if self.learning:
            self._pass.observe(positions, seconds)

    def observe_step(self, context_positions: float, seconds: float) -> None:
        """A step's worker time outside its passes, for its ``context_positions`` (the
        scheduled tokens); no-op for fixed coefficients."""
        if self.learning:
            self._step.observe(context_positions, seconds)
            self.observed += 1

    def observe_gap(self, seconds: float) -> None:
        """The time between two steps of a busy engine, outside the worker (the scheduler,
        output processing, transfers): part of every step's fixed cost, whatever its work."""
        if self.learning:
            self.gap = FORGETTING * self.gap + (1 - FORGETTING) * seconds

    def coefficients(self) -> torch.Tensor:
        """The coefficients decisions use: the fits', at least zero (a noisy fit can go
        negative, which would make some work look free), the gap added to the fixed cost."""
        if not self.learning:
            return self._fixed.clone()
        theta = torch.cat([self._step.theta, self._pass.theta]).clamp(min=0.0)
        theta[0] += self.gap
        return theta

    def seconds(self, work: StepWork) -> float:
        """Modelled seconds of a whole engine step doing ``work``."""
        return float(work.features() @ self.coefficients())

    def estimates(self) -> dict[str, float]:
        """The current coefficients by name (seconds), for the stats endpoint and /metrics."""
        return dict(zip(TERMS, self.coefficients().tolist(), strict=True))


class RunningAverage:
    """A moving average over engine steps of what the chosen multi-token steps showed: the
    tokens a block (or a draft step) emits up to its first EOS, the passes it takes.

    Forgetting :data:`FORGETTING` per engine step (so it follows a workload whose answers or
    confidence change), with ``prior`` weighing :data:`RIDGE` observations.  Why the prior:
    only the steps the policy chooses are observed, so an estimate that one unlucky block or
    draft made too pessimistic would otherwise never be revised; once such steps stop, the
    observations fade and the estimate drifts back to the prior, and a request tries again
    (the cost model's ridge does the same for its coefficients).
    """

    def __init__(self, prior: float) -> None:
        self.prior = prior
        self._sum = 0.0
        self._weight = 0.0

    def step(self, observed: torch.Tensor) -> None:
        """One engine step's observations, ``observed [n]`` (none: the estimate fades)."""
        self._sum = FORGETTING * self._sum + float(observed.sum())
        self._weight = FORGETTING * self._weight + observed.numel()

    @property
    def value(self) -> float:
        return (self._sum + RIDGE * self.prior) / (self._weight + RIDGE)


@dataclass(frozen=True)
class Candidate:
    """A request that may take its multi-token step (a diffusion block, a speculative draft)
    instead of one AR token in this engine step."""

    tokens: float  # tokens the multi-token step is expected to commit (bounded by what is left)
    passes: float  # denoiser passes it is expected to run
    width: float  # positions of its block or draft (per denoiser pass)
    #: context-tower positions it costs: the committed tokens, which the next step consumes,
    #: and a speculative verification's draft (an AR token costs one)
    context: float


@dataclass(frozen=True)
class Candidates:
    """Several :class:`Candidate` as float64 ``[n]`` tensors (one step's, built per slot)."""

    tokens: torch.Tensor
    passes: torch.Tensor
    width: torch.Tensor
    context: torch.Tensor

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> Candidates:
        columns = zip(*((c.tokens, c.passes, c.width, c.context) for c in candidates), strict=True)
        return cls(*(torch.tensor(list(col), dtype=torch.float64) for col in columns))


def choose_multi_token(
    model: StepCostModel,
    candidates: Candidates | Sequence[Candidate],
    fixed_tokens: float,
    fixed: StepWork,
) -> list[bool]:
    """Which candidates take their multi-token step (see the module docstring).

    ``fixed_tokens`` and ``fixed`` are what the rest of the step commits and computes (rows of
    fixed modes, prefill chunks).  Each token committed costs its context position when the
    next step consumes it, counted here as part of the step that commits it.  The denoiser's
    per-pass cost is shared by every row that denoises, so one block alone may not pay where
    many do: every prefix of the candidates, in order of extra tokens per extra second of
    their own positions, is evaluated (vectorised), and the best taken.
    """
    if not isinstance(candidates, Candidates):
        if not candidates:
            return []
        candidates = Candidates.of(candidates)
    c, theta = candidates, model.coefficients()
    own = theta[1] * (c.context - 1) + theta[3] * c.passes * c.width
    efficiency = torch.where(own > 0, (c.tokens - 1) / own, torch.inf)
    order = torch.argsort(efficiency, descending=True, stable=True)
    n = len(order)
    # Prefix k (k = 0..n) switches the k most efficient candidates from one AR token each.
    zero = torch.zeros(1, dtype=torch.float64)
    tokens = fixed_tokens + n + torch.cat([zero, (c.tokens - 1)[order].cumsum(0)])
    context = fixed.context_positions + n + torch.cat([zero, (c.context - 1)[order].cumsum(0)])
    passes = torch.cat([zero, c.passes[order].cummax(0).values]).clamp(min=fixed.denoiser_passes)
    positions = fixed.denoiser_positions + torch.cat([zero, (c.passes * c.width)[order].cumsum(0)])
    seconds = theta[0] + theta[1] * context + theta[2] * passes + theta[3] * positions
    best = int(torch.argmax(tokens / seconds.clamp(min=1e-12)))  # the first of equals
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[order[:best]] = True
    return chosen.tolist()

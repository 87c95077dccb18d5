"""Load-aware decoding (issue #24): which requests take a multi-token step in this engine step.

A diffusion block commits ``k`` tokens (up to a block) for ``p`` denoiser passes over the
block's ``w`` positions, and the next step's context pass then consumes the ``w`` positions; an
AR token commits one token for one context position.  When a step is bound by its fixed cost
(little load: the scheduler, the launches, reading the weights) the block wins by ``k``; when it
is bound by the positions it computes (heavy load), one position per token wins.  Only the
engine knows where it stands, so each step it decides, for each ``auto`` request (a diffusion
block or an AR token) and each ``speculative`` one (a draft, or just the AR token ``c``: the
output is ``ar``'s either way), whichever maximises the batch's committed tokens per second.

**Cost model** (:class:`StepCostModel`).  The time of an engine step is modelled as
``a + b_c·C + e·P + b_d·D``: a fixed cost ``a``, ``b_c`` per context-tower position ``C`` (the
scheduled tokens, and a speculative verification's draft), ``e`` per denoiser pass ``P`` (the
loop's rounds: launches and Python) and ``b_d`` per denoiser position ``D``.  It is learned
from the live step timings (exponentially weighted least squares, so it follows a machine whose
load changes) with a ridge towards a prior, so that directions the recent steps do not excite
(no diffusion at all under heavy load) fall back to the prior instead of winding up and
letting one noisy step swing the estimate.
``--hf-overrides '{"auto_cost_model": [a, b_c, e, b_d]}'`` fixes the coefficients instead:
decisions then depend on the requests only (tests, reproducible benchmarks), never on timing.

**Decision** (:func:`choose_multi_token`).  The step's throughput with the set ``S`` of requests
that take their multi-token step is ``N(S) / T(S)``: tokens committed over modelled time, the
other requests' (fixed) share included.  For a ratio of sums, the best ``S`` is a prefix of the
candidates ordered by their marginal tokens per marginal second (Dinkelbach's argument; the
per-pass term makes a row's marginal cost depend on the passes already paid, which the greedy
pass accounts for as it goes), so the candidates are taken in that order while each one raises
the ratio.  A request's ``k`` and ``p`` are its own running averages (its blocks or drafts so
far), else the engine's over the same kind of step, else a prior.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: The cost model's terms, in the order of its coefficient vector.
TERMS = ("overhead_s", "context_position_s", "denoiser_pass_s", "denoiser_position_s")
#: Where the learning starts (seconds): a small CPU model's magnitudes; a few steps move it.
PRIOR = (5e-3, 2e-4, 2e-3, 2e-4)
#: Forgetting factor of the weighted least squares: ~100 steps of memory.
FORGETTING = 0.99
#: Typical magnitudes of the terms' inputs (1, positions, passes, positions): the fit runs in
#: features scaled by these, so that the ridge below weighs every term alike.
SCALE = (1.0, 100.0, 1.0, 100.0)
#: How many steps' worth the prior weighs in the fit.
RIDGE = 1.0


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


class StepCostModel:
    """Seconds of an engine step as a linear function of its :class:`StepWork`."""

    def __init__(self, fixed: Sequence[float] | None = None) -> None:
        """Learn from :meth:`observe`, or, given ``fixed`` coefficients, keep them."""
        self.learning = fixed is None
        self.theta = torch.tensor(PRIOR if fixed is None else fixed, dtype=torch.float64)
        if self.theta.shape != (len(TERMS),) or bool((self.theta < 0).any()):
            raise ValueError(f"auto_cost_model must be {len(TERMS)} non-negative seconds {TERMS}")
        self._scale = torch.tensor(SCALE, dtype=torch.float64)
        self._xx = torch.zeros(len(TERMS), len(TERMS), dtype=torch.float64)
        self._xy = torch.zeros(len(TERMS), dtype=torch.float64)
        self.observed = 0

    def observe(self, work: StepWork, seconds: float) -> None:
        """Exponentially weighted least squares with a ridge towards the prior; no-op for
        fixed coefficients.

        In features scaled to ~1 (:data:`SCALE`), the prior weighs as much as one step
        (:data:`RIDGE`): it decides only where the recent steps say nothing, so a direction
        they stop exciting (no denoiser work on a busy all-AR server) drifts back to the prior
        instead of winding up, and one odd step cannot swing it far."""
        if not self.learning:
            return
        x = work.features() / self._scale
        self._xx = FORGETTING * self._xx + torch.outer(x, x)
        self._xy = FORGETTING * self._xy + x * seconds
        ridge = RIDGE * torch.eye(len(TERMS), dtype=torch.float64)
        prior = torch.tensor(PRIOR, dtype=torch.float64) * self._scale
        scaled = torch.linalg.solve(self._xx + ridge, self._xy + RIDGE * prior)
        self.theta = scaled / self._scale
        self.observed += 1

    def seconds(self, work: StepWork) -> float:
        """Modelled seconds of ``work``, with every coefficient at least zero (a noisy fit can
        go negative; a negative cost would make some work look free)."""
        return float(work.features() @ self.theta.clamp(min=0.0))

    def estimates(self) -> dict[str, float]:
        """The current coefficients by name (seconds), for the stats endpoint and /metrics."""
        return dict(zip(TERMS, self.theta.clamp(min=0.0).tolist(), strict=True))


@dataclass(frozen=True)
class Candidate:
    """A request that may take its multi-token step (a diffusion block, a speculative draft)
    instead of one AR token in this engine step."""

    tokens: float  # tokens the multi-token step is expected to commit (bounded by what is left)
    passes: float  # denoiser passes it is expected to run
    width: int  # positions of its block or draft (per denoiser pass)
    #: context-tower positions it costs: the committed tokens, which the next step consumes,
    #: and a speculative verification's draft (an AR token costs one)
    context: float


def choose_multi_token(
    model: StepCostModel,
    candidates: Sequence[Candidate],
    fixed_tokens: float,
    fixed: StepWork,
) -> list[bool]:
    """Which candidates take their multi-token step (see the module docstring).

    ``fixed_tokens`` and ``fixed`` are what the rest of the step commits and computes (rows of
    fixed modes, prefill chunks).  Each token committed costs its context position when the
    next step consumes it, counted here as part of the step that commits it.
    """
    chosen = [False] * len(candidates)
    if not candidates:
        return chosen
    tokens = fixed_tokens + len(candidates)  # everyone takes the AR step ...
    context = fixed.context_positions + len(candidates)
    passes, positions = fixed.denoiser_passes, fixed.denoiser_positions

    def ratio(tokens: float, context: float, passes: float, positions: float) -> float:
        seconds = model.seconds(StepWork(context, passes, positions))
        return tokens / seconds if seconds > 0 else float("inf")

    def marginal(c: Candidate) -> float:
        """Extra tokens per extra modelled second, the step's passes as they stand now."""
        extra = StepWork(c.context - 1, max(0.0, c.passes - passes), c.passes * c.width)
        seconds = model.seconds(extra) - model.theta[0].clamp(min=0.0).item()  # no overhead
        return (c.tokens - 1) / seconds if seconds > 0 else float("inf")

    best = ratio(tokens, context, passes, positions)
    remaining = list(range(len(candidates)))
    while remaining:  # ... and each in turn switches while it raises the step's throughput
        i = max(remaining, key=lambda j: marginal(candidates[j]))
        c = candidates[i]
        trial = (
            tokens + c.tokens - 1,
            context + c.context - 1,
            max(passes, c.passes),
            positions + c.passes * c.width,
        )
        if ratio(*trial) <= best:
            break
        chosen[i] = True
        best = ratio(*trial)
        tokens, context, passes, positions = trial
        remaining.remove(i)
    return chosen

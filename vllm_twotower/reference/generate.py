"""Reference generation in the TwoTower modes (``shared/spec/twotower-model.md`` §4).

Requests are generated one after another with cached context state (KV and Mamba states are
extended, never recomputed).  This is the oracle the vLLM engine is held to token for token, so
it favours clarity: one function per kind of engine step (an AR token, a diffusion block, a
speculative draft; mock-AR's own loop), the commit rule from :mod:`vllm_twotower.commit`.  A
request takes its mode's step every time, or, in ``auto`` (and load-aware ``speculative``), the
steps the engine chose, replayed from its schedule.

Conventions shared with the engine:

* sampling noise is keyed by ``(seed, absolute token position, denoising step)``; AR and
  mock-AR draw at step 0;
* a diffusion block starts a whole number of blocks after the prompt, in ``auto`` too;
* a diffusion block is always denoised in full (``block_size`` positions) and the output is then
  cut after the first EOS and at ``max_new_tokens``; AR and mock-AR stop right after EOS;
* the mask id is suppressed only in mask diffusion (and the denoiser's speculative drafts).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from vllm_twotower.commit import (
    SamplingFilters,
    accept_draft,
    commit_step,
    fold_seed,
    noise_row_keys,
    predict,
    reported_logprobs,
)
from vllm_twotower.logit_adjust import LogitAdjuster, adjustments_active, pad_bad_words
from vllm_twotower.params import (
    AR_STEP,
    AUTO,
    DIFFUSION_STEP,
    MOCK_AR,
    MODE_STEPS,
    TwoTowerParams,
)
from vllm_twotower.reference.blocks import ContextState
from vllm_twotower.reference.model import TwoTowerModel


@dataclass(frozen=True)
class SamplingSpec:
    """The engine-independent part of a request's sampling parameters."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0
    ignore_eos: bool = False
    #: vLLM's filters of the sampled distribution (:func:`~vllm_twotower.commit.sampling_cutoff`)
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    #: vLLM's penalties, logit bias and allowed ids (:mod:`vllm_twotower.logit_adjust`)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] = ()
    #: EOS is banned until the output is this long (vLLM bans it even under ``ignore_eos``)
    min_tokens: int = 0
    #: ``bad_words`` as vLLM's front end tokenizes them (``SamplingParams.bad_words_token_ids``)
    bad_words: tuple[tuple[int, ...], ...] = ()
    #: what ``logprobs`` report (vLLM's ``--logprobs-mode``, :func:`reported_logprobs`)
    logprobs_mode: str = "raw_logprobs"

    def adjust(
        self, logits: torch.Tensor, prompt: torch.Tensor, output_ids: list[int], eos: int
    ) -> torch.Tensor:
        """``logits`` (one row: ``[..., V]``) with this request's allowed ids, bad words,
        ``min_tokens`` (banning ``eos``), bias and penalties, given the tokens committed before
        the token or block they choose."""
        bias_ids = torch.tensor([[i for i, _ in self.logit_bias]], dtype=torch.int64)
        bias_values = torch.tensor([[v for _, v in self.logit_bias]], dtype=torch.float32)
        allowed_ids = torch.tensor([self.allowed_token_ids], dtype=torch.int64).view(1, -1)
        penalties = [self.presence_penalty, self.frequency_penalty, self.repetition_penalty]
        presence, frequency, repetition = (torch.tensor([p]) for p in penalties)
        bias_ids = bias_ids.view(1, -1)
        min_tokens = torch.tensor([self.min_tokens])
        lists = (bias_ids, allowed_ids, min_tokens)
        length = max([1, *(len(w) for w in self.bad_words)])
        bad_words = pad_bad_words(self.bad_words, len(self.bad_words), length)[None]
        if not bool(adjustments_active(presence, frequency, repetition, *lists, bad_words)):
            return logits
        adjuster = LogitAdjuster.build(
            logits.shape[-1],
            prompts=[prompt],
            outputs=[torch.tensor(output_ids, dtype=torch.int64)],
            presence=presence,
            frequency=frequency,
            repetition=repetition,
            bias_ids=bias_ids,
            bias_values=bias_values.view(1, -1),
            allowed_ids=allowed_ids,
            min_tokens=min_tokens,
            stop_ids=torch.tensor([[eos]]),
            bad_words=bad_words,
        )
        return adjuster.to(logits.device)(logits[None])[0]

    def filters(self, rows: int = 1) -> SamplingFilters:
        """These filters for ``rows`` rows (``rows = 0``: one row, unbatched)."""
        shape = (rows,) if rows else ()
        return SamplingFilters(
            torch.full(shape, max(self.top_k, 0), dtype=torch.int64),
            torch.full(shape, self.top_p, dtype=torch.float64),
            torch.full(shape, self.min_p, dtype=torch.float64),
        )


@dataclass
class GenerationResult:
    """One request's output and how it was produced."""

    output_ids: list[int]
    nfe: int = 0  # denoiser forward passes
    tokens_per_step: list[int] = field(default_factory=list)  # tokens decided by each model step
    finish_reason: str = "length"  # "stop" (EOS) or "length"
    #: what a request's ``logprobs`` report for each output token, from the distribution it was
    #: committed from (:func:`~vllm_twotower.commit.reported_logprobs`)
    logprobs: list[float] = field(default_factory=list)
    #: speculative mode: drafted tokens accepted by each verification
    accepted: list[int] = field(default_factory=list)


def _as_list(value: object, n: int) -> list:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != n:
            raise ValueError(f"expected {n} per-request values, got {len(value)}")
        return list(value)
    return [value] * n


@torch.inference_mode()
def generate(
    model: TwoTowerModel,
    prompts: Sequence[Sequence[int]],
    params: TwoTowerParams | Sequence[TwoTowerParams] | None = None,
    sampling: SamplingSpec | Sequence[SamplingSpec] = SamplingSpec(),
    schedules: Sequence[str | None] | None = None,
) -> list[GenerationResult]:
    """Generate for each prompt with its own (or a shared) mode and sampling parameters.

    ``schedules[i]`` replays what each engine step did for request ``i`` (``twotower_stats``'
    ``schedule``: :data:`~vllm_twotower.params.DIFFUSION_STEP`, ``AR_STEP``, ``DRAFT_STEP``
    per step): required for ``auto``, whose steps the engine chooses by load, and accepted
    for ``speculative`` (whose AR steps skip the draft); other modes take their one step.
    """
    defaults = model.config.diffusion
    default_params = TwoTowerParams(
        block_size=defaults.block_size,
        steps_per_block=defaults.steps_per_block,
        confidence_threshold=defaults.confidence_threshold,
    )
    params_list = _as_list(params if params is not None else default_params, len(prompts))
    sampling_list = _as_list(sampling, len(prompts))
    schedule_list = list(schedules) if schedules is not None else [None] * len(prompts)
    results = []
    for prompt, p, s, schedule in zip(
        prompts, params_list, sampling_list, schedule_list, strict=True
    ):
        if not prompt:
            raise ValueError("prompt must contain at least one token")
        ids = torch.tensor(list(prompt), dtype=torch.long, device=model.device)
        if p.mode == MOCK_AR:
            results.append(_generate_mock_ar(model, ids, p, s))
        else:
            results.append(_generate_steps(model, ids, p, s, _steps_of(p.mode, schedule)))
    return results


def _steps_of(mode: str, schedule: str | None) -> Iterator[str]:
    """The steps a request of ``mode`` takes: ``schedule``'s, checked, or its mode's one."""
    allowed = MODE_STEPS[mode]
    if schedule is None:
        if mode == AUTO:
            raise ValueError("auto needs the schedule the engine chose (twotower_stats)")
        return itertools.repeat(allowed[0])
    unknown = set(schedule) - set(allowed)
    if unknown:
        raise ValueError(f"a {mode} schedule holds only {allowed}, got {sorted(unknown)}")
    return iter(schedule)


class _Stopper:
    """Applies EOS and ``max_new_tokens`` to the growing output."""

    def __init__(self, model: TwoTowerModel, sampling: SamplingSpec) -> None:
        self.eos = None if sampling.ignore_eos else model.config.eos_token_id
        self.max_new_tokens = sampling.max_new_tokens

    def finish(self, result: GenerationResult) -> bool:
        """Cut ``result.output_ids`` after EOS / at the length limit; True when done."""
        ids = result.output_ids[: self.max_new_tokens]  # an EOS past the limit is not seen
        if self.eos is not None and self.eos in ids:
            end, result.finish_reason = ids.index(self.eos) + 1, "stop"
        elif len(ids) >= self.max_new_tokens:
            end, result.finish_reason = self.max_new_tokens, "length"
        else:
            return False
        del result.output_ids[end:], result.logprobs[end:]
        return True


def _emit_next(
    result: GenerationResult,
    logits: torch.Tensor,
    sampling: SamplingSpec,
    position: int,
    prompt: torch.Tensor,
    eos: int,
) -> int:
    """Append the next token from one logit row (no mask suppression: AR and mock-AR may emit
    it; bias and penalties applied) and its reported log-probability to ``result``; return
    it."""
    keys = noise_row_keys(
        torch.tensor(fold_seed(sampling.seed)), torch.tensor(position), torch.tensor(0)
    )
    adjusted = sampling.adjust(logits, prompt, result.output_ids, eos)
    choice = {
        "mask_id": None,
        "temperature": torch.tensor(sampling.temperature),
        "filters": sampling.filters(rows=0).to(logits.device),
    }
    token, _ = predict(adjusted, row_keys=keys, **choice)
    reported = reported_logprobs(
        logits, logprobs_mode=sampling.logprobs_mode, adjusted=adjusted, **choice
    )
    result.output_ids.append(int(token))
    result.logprobs.append(float(reported[token]))
    result.tokens_per_step.append(1)
    return int(token)


def _generate_steps(
    model: TwoTowerModel,
    prompt: torch.Tensor,
    params: TwoTowerParams,
    sampling: SamplingSpec,
    steps: Iterator[str],
) -> GenerationResult:
    """Generate by the given steps, as the engine's block step runs them, one per engine step:
    an AR token from the context tower's logits (``ar``), a block denoised after the context
    (``mask_diffusion``), a speculative draft verified by the context tower.  Each step starts
    where the committed text ends (a block only on its block grid, :func:`_check_on_grid`),
    and the context then consumes what it committed."""
    result, stopper = GenerationResult([]), _Stopper(model, sampling)
    logits, state = model.extend_context(prompt, model.empty_context())
    eos = model.config.eos_token_id
    for step in steps:
        if step == AR_STEP:
            committed = prompt.new_tensor(
                [_emit_next(result, logits[-1], sampling, state.length, prompt, eos)]
            )
        elif step == DIFFUSION_STEP:
            _check_on_grid(result, params)
            committed = _diffusion_step(model, state, params, sampling, prompt, result)
        else:
            committed = _speculative_step(model, logits, state, params, sampling, prompt, result)
        if stopper.finish(result):
            return result
        logits, state = model.extend_context(committed, state)
    raise ValueError("the schedule ended before the output did")


def _check_on_grid(result: GenerationResult, params: TwoTowerParams) -> None:
    """A diffusion block starts on its request's block grid (a whole number of blocks after
    the prompt), where ``mask_diffusion``'s blocks start and the denoiser was trained to start
    them (:mod:`vllm_twotower.train.batching`): ``auto`` switches to AR at any step but back to
    blocks only there, since a block started off the grid loses most of its accuracy
    (``benchmarks/block_alignment.py``)."""
    offset = len(result.output_ids) % params.block_size
    if offset:
        raise ValueError(
            f"a diffusion block starts on the {params.block_size}-token block grid, not "
            f"{offset} tokens into a block (after {len(result.output_ids)} output tokens)"
        )


def _generate_mock_ar(
    model: TwoTowerModel, prompt: torch.Tensor, params: TwoTowerParams, sampling: SamplingSpec
) -> GenerationResult:
    """One token per step from the denoiser run on the last committed token.

    The denoiser sees the context *before* that token (its KV and the Mamba state after the
    token before it), with no time conditioning; the context tower then consumes the token.
    """
    result, stopper = GenerationResult([]), _Stopper(model, sampling)
    _, before = model.extend_context(prompt[:-1], model.empty_context())
    last = prompt[-1:]
    while True:
        logits = model.denoise(last, before, t=None)
        result.nfe += 1
        eos = model.config.eos_token_id
        token = _emit_next(result, logits[-1], sampling, before.length + 1, prompt, eos)
        if stopper.finish(result):
            return result
        _, before = model.extend_context(last, before)
        last = last.new_tensor([token])


def fill_blocks(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    rows: int,
    params: TwoTowerParams,
    *,
    mask_id: int,
    block_start: int,
    device: torch.device,
    temperature: float = 0.0,
    seed: int = 0,
    filters: SamplingFilters | None = None,
    adjust: Callable[[torch.Tensor], torch.Tensor] | None = None,
    canvas: torch.Tensor | None = None,
    logprobs_mode: str = "raw_logprobs",
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Denoise ``rows`` blocks of ``[MASK]`` with the commit rule, all from the same position.

    ``canvas [rows, S]`` starts the blocks with some positions already decided (a speculative
    draft's first token); by default every position is masked.

    ``logits_of(canvas [rows, S]) -> [rows, S, V]`` is the denoiser pass (its time conditioning
    included).  Returns ``(blocks [rows, S], positions decided by each pass [rows], each
    token's reported log-probability in the pass that decided it [rows, S])``; passes stop
    once no row holds a mask.  The reference calls it with one row; stage-2 validation
    (:mod:`vllm_twotower.train.decoding`) with a batch of equal-length prompts.  ``filters``
    (per row) and ``adjust`` (logit bias and penalties) shape the distribution tokens are
    committed from; ``logprobs_mode`` says what the log-probabilities report
    (:func:`~vllm_twotower.commit.reported_logprobs`).
    """
    size, steps = params.block_size, params.steps_per_block
    if canvas is None:
        canvas = torch.full((rows, size), mask_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, size, device=device)
    per_pass = []

    def per_row(value: float | int, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((rows,), value, dtype=dtype, device=device)

    for step in range(steps):
        if not bool((canvas == mask_id).any()):
            break
        logits = logits_of(canvas)
        adjusted = adjust(logits) if adjust is not None else logits
        committed = commit_step(
            adjusted,
            canvas,
            mask_id=mask_id,
            threshold=per_row(params.confidence_threshold, torch.float32),
            step=per_row(step, torch.long),
            steps_per_block=per_row(steps, torch.long),
            temperature=per_row(temperature, torch.float32),
            seed=per_row(seed, torch.long),
            block_start=per_row(block_start, torch.long),
            filters=filters,
        )
        decided = (canvas == mask_id) & (committed.canvas != mask_id)
        reported = reported_logprobs(
            logits,
            mask_id=mask_id,
            logprobs_mode=logprobs_mode,
            adjusted=adjusted,
            temperature=per_row(temperature, torch.float32)[:, None].expand(canvas.shape),
            filters=filters.expand(canvas.shape) if filters is not None else None,
        )
        chosen = reported.gather(-1, committed.canvas[..., None])
        logprobs = torch.where(decided, chosen[..., 0], logprobs)
        canvas = committed.canvas
        per_pass.append(committed.num_committed)
    return canvas, per_pass, logprobs


def denoise_block(
    model: TwoTowerModel,
    context: ContextState,
    params: TwoTowerParams,
    sampling: SamplingSpec,
    prompt: torch.Tensor,
    output_ids: list[int],
    first: int | None = None,
) -> tuple[torch.Tensor, list[int], list[float]]:
    """Fill one block of ``[MASK]`` after ``context`` (``prompt`` then ``output_ids``, the
    history the penalties see); return ``(block ids, tokens per pass, each token's
    log-probability)``.  ``first`` decides the block's first position up front."""
    mask_id = model.config.diffusion.mask_token_id
    canvas = torch.full((1, params.block_size), mask_id, dtype=torch.long, device=model.device)
    if first is not None:
        canvas[0, 0] = first

    def logits_of(canvas: torch.Tensor) -> torch.Tensor:
        t = int((canvas == mask_id).sum()) / params.block_size
        return model.denoise(canvas[0], context, t=t)[None]

    block, per_pass, logprobs = fill_blocks(
        logits_of,
        1,
        params,
        mask_id=mask_id,
        block_start=context.length,
        device=model.device,
        temperature=sampling.temperature,
        seed=fold_seed(sampling.seed),
        filters=sampling.filters(rows=1).to(model.device),
        adjust=lambda logits: sampling.adjust(
            logits, prompt, output_ids, model.config.eos_token_id
        ),
        canvas=canvas,
        logprobs_mode=sampling.logprobs_mode,
    )
    return block[0], [int(n[0]) for n in per_pass], logprobs[0].tolist()


def _diffusion_step(
    model: TwoTowerModel,
    context: ContextState,
    params: TwoTowerParams,
    sampling: SamplingSpec,
    prompt: torch.Tensor,
    result: GenerationResult,
) -> torch.Tensor:
    """Block-wise mask diffusion: denoise a block after ``context``; return it (to commit)."""
    block, per_pass, logprobs = denoise_block(
        model, context, params, sampling, prompt, result.output_ids
    )
    result.nfe += len(per_pass)
    result.tokens_per_step.extend(per_pass)
    result.output_ids.extend(block.tolist())
    result.logprobs.extend(logprobs)
    return block


def _speculative_step(
    model: TwoTowerModel,
    logits: torch.Tensor,
    state: ContextState,
    params: TwoTowerParams,
    sampling: SamplingSpec,
    prompt: torch.Tensor,
    result: GenerationResult,
) -> torch.Tensor:
    """Self-speculative decoding's step: ``ar``'s tokens, drafted by the denoiser.

    It mirrors one engine step: the AR token ``c`` after the context comes from the context
    tower's ``logits`` (as in ``ar``); the denoiser fills a block whose first position is
    ``c`` (:meth:`TwoTowerParams.draft`); the context tower runs over the draft and
    :func:`~vllm_twotower.commit.accept_draft` keeps the guesses equal to the AR tokens plus
    the AR token at the first mismatch.  Returns ``c`` and those tokens, which the context
    then consumes.
    """
    # The engine drafts in the step that chooses c, before the scheduler sees c: so does
    # the reference (the denoiser counters stay equal), and cuts after the verification.
    eos = model.config.eos_token_id
    first = _emit_next(result, logits[-1], sampling, state.length, prompt, eos)
    draft, per_pass, _ = denoise_block(
        model, state, params.draft(), sampling, prompt, result.output_ids, first=first
    )
    # ar may choose the mask id itself, which the commit rule reads as undecided and
    # fills: the draft keeps c whatever the denoiser put there.
    draft[0] = first
    result.nfe += len(per_pass)
    verify, _ = model.extend_context(draft, state)
    ar, accepted = accept_draft(
        draft[None],
        verify[None],
        length=torch.tensor([params.block_size], device=model.device),
        temperature=torch.tensor([sampling.temperature], device=model.device),
        seed=torch.tensor([fold_seed(sampling.seed)], device=model.device),
        block_start=torch.tensor([state.length], device=model.device),
        filters=sampling.filters(rows=1).to(model.device),
    )
    k = int(accepted[0])
    emitted = ar[0, : k + 1]
    result.accepted.append(k)
    result.tokens_per_step[-1] += k + 1  # c and what the verification let through
    result.output_ids.extend(emitted.tolist())
    logprobs = reported_logprobs(
        verify[: k + 1],
        mask_id=None,
        logprobs_mode=sampling.logprobs_mode,
        temperature=torch.full((k + 1,), sampling.temperature, device=model.device),
        filters=sampling.filters(rows=k + 1).to(model.device),
    )
    result.logprobs.extend(logprobs.gather(-1, emitted[:, None])[:, 0].tolist())
    return torch.cat([draft[:1], emitted])

"""The TwoTower commit rule ("re-masking"): the one home of how a denoising step decides tokens.

Every path that denoises a block calls :func:`commit_step` — the reference implementation and
the vLLM model runner.  It runs the compiled kernel where one is built and
:func:`commit_step_torch` (the readable definition, the kernels' fallback and test oracle)
otherwise.  The rule is the one of ``shared/spec/twotower-model.md`` §4:

* the mask id is never predicted (its logit is suppressed before the softmax);
* the prediction is the argmax (greedy) or a Gumbel-max draw from ``logits / temperature``
  restricted to the tokens the request's ``min_p`` / ``top_k`` / ``top_p`` keep
  (:func:`sampling_cutoff`); its confidence is always the *untempered*, unfiltered softmax
  probability of the predicted token (spec §4: "confidence stays the untempered probability");
* already-decided positions keep their token (confidence ``+inf``);
* of the ``n`` masked positions, ``k`` are decided, where
  ``k = n`` on the last step, else ``k = min(n, max(#(conf > γ), 1, ceil(n / (T - step))))``;
* the ``k`` decided positions are those of highest confidence, ties going to the lower position.

Canvases are batched as ``[B, S]`` rows.  A position that holds no mask id is "decided", which
is also how a request with a smaller block size pads its row: padding never takes part.

Sampling noise comes from a counter-based hash of ``(seed, absolute token position, denoising
step, vocabulary id)`` rather than a stateful generator, so that the reference, the engine (whose
batch composition changes every step) and the kernels draw exactly the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_twotower.ops.commit import commit_kernel_supports, commit_step_kernel

_M32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


def mix32(x: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` integer hash of uint32 values held in an int64 tensor (wrapping multiply)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def fold_seed(seed: int) -> int:
    """Fold a Python (up to 64-bit) seed into the 32 bits the noise hash takes."""
    seed &= 0xFFFFFFFFFFFFFFFF
    return (seed ^ (seed >> 32)) & _M32


def noise_row_keys(seed: torch.Tensor, position: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Per-row base key of the noise hash; every argument is int64 and broadcastable."""
    key = mix32(seed & _M32)
    key = mix32(key ^ (position & _M32))
    return mix32(key ^ (step & _M32))


def gumbel_noise(row_keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise ``[..., vocab]`` (float64) for rows keyed by :func:`noise_row_keys`."""
    vocab_ids = torch.arange(vocab_size, dtype=torch.int64, device=row_keys.device)
    bits = mix32((row_keys.unsqueeze(-1) + vocab_ids * _GOLDEN32) & _M32)
    uniform = (bits.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)
    return -torch.log(-torch.log(uniform))


@dataclass(frozen=True)
class SamplingFilters:
    """vLLM's ``min_p`` / ``top_k`` / ``top_p`` of each row, applied only where it samples.

    Shapes match the rows' ``temperature``.  The neutral values (``0``, ``0``, ``1``) filter
    nothing, as in vLLM (which also treats ``top_k = -1`` as off; admission maps it to 0).
    """

    top_k: torch.Tensor  # int64, 0 = off
    top_p: torch.Tensor  # float64, 1 = off
    min_p: torch.Tensor  # float64, 0 = off

    def active(self) -> torch.Tensor:
        """Bool: the rows where at least one filter is on."""
        return (self.top_k > 0) | (self.top_p < 1) | (self.min_p > 0)

    def select(self, index: torch.Tensor) -> SamplingFilters:
        """The filters of rows ``index`` (any indexing torch accepts)."""
        return SamplingFilters(self.top_k[index], self.top_p[index], self.min_p[index])

    def expand(self, shape: torch.Size) -> SamplingFilters:
        """Per-row ``[B]`` filters broadcast to ``[B, S]`` positions."""
        return SamplingFilters(*(v.unsqueeze(-1).expand(shape) for v in self._values()))

    def to(self, device: torch.device | str) -> SamplingFilters:
        return SamplingFilters(*(v.to(device) for v in self._values()))

    def _values(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.top_k, self.top_p, self.min_p


def _filter_cutoff(tempered: torch.Tensor, filters: SamplingFilters) -> torch.Tensor:
    """The smallest tempered logit each row keeps (see :func:`sampling_cutoff`)."""
    vocab = tempered.shape[-1]
    ordered = tempered.sort(dim=-1, descending=True).values
    probs = torch.softmax(ordered, dim=-1)
    # min_p: the probabilities of the tempered distribution, against min_p * the largest.
    keep = probs >= (filters.min_p * probs[..., 0]).unsqueeze(-1)
    # top_k: every token at least as large as the k-th largest (ties kept, as vLLM's mask).
    k = torch.where(filters.top_k > 0, filters.top_k.clamp(max=vocab), vocab)
    keep &= ordered >= ordered.gather(-1, (k - 1).unsqueeze(-1))
    # top_p: the renormalised mass of the tokens kept so far; a token stays while the mass
    # strictly before it is below p (vLLM: its ascending suffix sum is above 1 - p).
    renormalised = torch.softmax(ordered.masked_fill(~keep, float("-inf")), dim=-1)
    mass = torch.cumsum(renormalised, dim=-1)  # non-decreasing: the terms are >= 0
    before = torch.cat([torch.zeros_like(mass[..., :1]), mass[..., :-1]], dim=-1)
    keep &= (before < filters.top_p.unsqueeze(-1)) | (filters.top_p >= 1).unsqueeze(-1)
    kept = keep.sum(dim=-1).clamp(min=1)  # a prefix of ``ordered``; never empty
    return ordered.gather(-1, (kept - 1).unsqueeze(-1)).squeeze(-1)


def sampling_cutoff(
    logits: torch.Tensor,
    *,
    mask_id: int | None,
    temperature: torch.Tensor,
    filters: SamplingFilters | None,
) -> torch.Tensor:
    """Float64 ``[...]``: the smallest tempered logit a sampling row may draw, else ``-inf``.

    vLLM's order and definitions (``vllm/v1/sample``: temperature, then the ``min_p`` logits
    processor, then ``apply_top_k_top_p``), on ``t = logits.double() / temperature`` with the
    mask id suppressed:

    * ``min_p``: keep tokens whose probability under ``softmax(t)`` is ``>= min_p * max``;
    * ``top_k``: of those, keep tokens with ``t >=`` the ``k``-th largest ``t``;
    * ``top_p``: renormalise over the kept tokens, order them by ``t`` descending, keep the
      shortest prefix whose mass reaches ``top_p`` (a token stays while the mass strictly
      before it is ``< top_p``; ``top_p = 1`` keeps all).

    Each filter keeps an upper set of ``t``, so the kept set is ``{t >= cutoff}``, where the
    cutoff is the smallest kept value.  Ties at the cutoff are all kept (vLLM's sort splits
    them arbitrarily; a value threshold is order-free and identical in every path).  Greedy
    rows and rows with no filter get ``-inf`` (nothing removed).  The compiled kernels take
    this cutoff as an input, so the filter costs one sort per filtered row, in torch, and the
    draw stays one fused pass.
    """
    cutoff = torch.full(temperature.shape, float("-inf"), dtype=torch.float64)
    cutoff = cutoff.to(logits.device)
    if filters is None:
        return cutoff
    rows = (temperature > 0) & filters.active()
    if not bool(rows.any()):
        return cutoff
    tempered = _suppressed(logits[rows], mask_id).double() / temperature[rows].double()[..., None]
    cutoff[rows] = _filter_cutoff(tempered, filters.select(rows))
    return cutoff


@dataclass
class CommitResult:
    """Outcome of one denoising step over a batch of canvases."""

    canvas: torch.Tensor  # [B, S] int64: the canvases with this step's decisions written in
    num_committed: torch.Tensor  # [B] int64: positions decided in this step
    confidence: torch.Tensor  # [B, S] float32: prediction confidence (+inf where decided before)


def _suppressed(logits: torch.Tensor, mask_id: int | None) -> torch.Tensor:
    """Float32 logits with ``mask_id`` (if any) made impossible; the input is left intact."""
    logits = logits.float()
    if mask_id is not None:
        logits = logits.clone()
        logits[..., mask_id] = float("-inf")
    return logits


def predict(
    logits: torch.Tensor,
    *,
    mask_id: int | None,
    temperature: torch.Tensor,
    row_keys: torch.Tensor | None,
    filters: SamplingFilters | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token prediction and its untempered confidence for each logit row.

    Args:
        logits: ``[..., V]`` logits (any float dtype; computed in float32).
        mask_id: a token id that must never be predicted, or ``None`` (AR and mock-AR).
        temperature: ``[...]`` per-row temperature; rows with ``0`` take the argmax.
        row_keys: ``[...]`` noise keys (:func:`noise_row_keys`); required when any row samples.
        filters: ``[...]`` min_p / top_k / top_p of sampling rows (:func:`sampling_cutoff`).

    Returns:
        ``(token ids [...] int64, confidence [...] float32)``.
    """
    cutoff = sampling_cutoff(logits, mask_id=mask_id, temperature=temperature, filters=filters)
    logits = _suppressed(logits, mask_id)
    tokens = logits.argmax(dim=-1)
    sampling = temperature > 0
    if bool(sampling.any()):
        if row_keys is None:
            raise ValueError("row_keys are required when a row samples (temperature > 0)")
        temp = torch.where(sampling, temperature, torch.ones_like(temperature)).double()
        tempered = logits.double() / temp.unsqueeze(-1)
        perturbed = torch.where(
            tempered >= cutoff.unsqueeze(-1),
            tempered + gumbel_noise(row_keys, logits.shape[-1]),
            float("-inf"),
        )
        tokens = torch.where(sampling, perturbed.argmax(dim=-1), tokens)
    log_z = torch.logsumexp(logits, dim=-1)
    confidence = torch.exp(logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_z)
    return tokens, confidence


#: vLLM's ``--logprobs-mode`` values (``vllm/config/model.py: LogprobsMode``), all honoured.
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")


def processed_logits(
    logits: torch.Tensor,
    *,
    mask_id: int | None,
    temperature: torch.Tensor,
    filters: SamplingFilters | None,
) -> torch.Tensor:
    """Float32 ``[..., V]``: the logits a token is drawn from, as vLLM's sampler processes them.

    ``logits`` are those :func:`predict` is given (the request's allowed ids, bad words, bias
    and penalties already applied, :mod:`vllm_twotower.logit_adjust`), with the mask id
    suppressed, divided by the row's temperature (``1`` for greedy rows, as vLLM's
    ``apply_temperature`` does in a mixed batch), and ``-inf`` outside what the row's
    ``min_p`` / ``top_k`` / ``top_p`` keep (:func:`sampling_cutoff`).  vLLM's sampler returns
    this tensor as ``processed_logits`` (and its log-softmax as ``processed_logprobs``).
    """
    cutoff = sampling_cutoff(logits, mask_id=mask_id, temperature=temperature, filters=filters)
    logits = _suppressed(logits, mask_id)
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    kept = logits.double() / temp.double().unsqueeze(-1) >= cutoff.unsqueeze(-1)
    return (logits / temp.float().unsqueeze(-1)).masked_fill(~kept, float("-inf"))


def reported_logprobs(
    raw: torch.Tensor,
    *,
    mask_id: int | None,
    logprobs_mode: str = "raw_logprobs",
    adjusted: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    filters: SamplingFilters | None = None,
) -> torch.Tensor:
    """What a request's ``logprobs`` report ``[..., V]`` (float32) for tokens chosen from a
    distribution, in vLLM's ``logprobs_mode``; the reference and the engine both call it.

    The distribution is the one each token is committed from: the model's ``raw`` logits
    (the context tower's in ``ar`` and a speculative verification, the denoiser pass that
    decided it in ``mask_diffusion`` and ``mock_ar``) with the mask id suppressed where
    :func:`predict` suppresses it, so a greedy token's raw log-probability is the log of its
    commit confidence.  The ``raw_*`` modes report those logits (or their log-softmax: vLLM's
    default); the ``processed_*`` modes report :func:`processed_logits` of the ``adjusted``
    logits the commit rule chose from (``raw`` when no adjustment applies) under each row's
    ``temperature`` and ``filters`` (or their log-softmax).
    """
    if logprobs_mode.startswith("raw_"):
        values = _suppressed(raw, mask_id)
    else:
        if temperature is None:
            raise ValueError(f"logprobs_mode {logprobs_mode!r} needs the rows' temperature")
        values = processed_logits(
            raw if adjusted is None else adjusted,
            mask_id=mask_id,
            temperature=temperature,
            filters=filters,
        )
    return torch.log_softmax(values, dim=-1) if logprobs_mode.endswith("logprobs") else values


def num_to_commit(
    confidence: torch.Tensor,
    masked: torch.Tensor,
    *,
    threshold: torch.Tensor,
    step: torch.Tensor,
    steps_per_block: torch.Tensor,
) -> torch.Tensor:
    """How many masked positions each row decides in this step (``k`` of the module docstring).

    Args:
        confidence: ``[B, S]`` float confidences of the predictions.
        masked: ``[B, S]`` bool, positions still holding the mask id.
        threshold: ``[B]`` γ per row; step, steps_per_block: ``[B]`` int64.
    """
    n = masked.sum(dim=-1)
    confident = ((confidence > threshold.unsqueeze(-1).to(confidence.dtype)) & masked).sum(dim=-1)
    remaining_steps = (steps_per_block - step).clamp(min=1)
    floor = torch.div(n + remaining_steps - 1, remaining_steps, rounding_mode="floor")
    k = torch.maximum(torch.maximum(confident, torch.ones_like(n)), floor)
    k = torch.where(step >= steps_per_block - 1, n, k)
    return torch.minimum(k, n)


def select_commits(confidence: torch.Tensor, masked: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, S]``: the ``k`` masked positions of highest confidence, ties to lower ones."""
    ranked = torch.where(masked, confidence.float(), torch.full_like(confidence.float(), -1.0))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return masked & (rank < k.unsqueeze(-1))


def commit_step(
    logits: torch.Tensor,
    canvas: torch.Tensor,
    *,
    mask_id: int,
    threshold: torch.Tensor,
    step: torch.Tensor,
    steps_per_block: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    block_start: torch.Tensor,
    filters: SamplingFilters | None = None,
    use_kernel: bool = True,
) -> CommitResult:
    """One denoising step of the commit rule over ``B`` canvases of ``S`` positions.

    Runs the compiled kernel ``torch.ops.twotower.commit_step`` (one fused pass over each logit
    row, see ``docs/kernels.md``) when it is built and supports the inputs, else
    :func:`commit_step_torch`, which defines the rule.  ``use_kernel=False`` or the environment
    variable ``TWOTOWER_DISABLE_KERNELS=1`` forces the torch path.  Arguments are those of
    :func:`commit_step_torch`.
    """
    rule_args = {
        "mask_id": mask_id,
        "threshold": threshold,
        "step": step,
        "steps_per_block": steps_per_block,
        "temperature": temperature,
        "seed": seed,
        "block_start": block_start,
    }
    if use_kernel and commit_kernel_supports(logits, canvas, mask_id):
        temps = temperature.unsqueeze(-1).expand_as(canvas)
        row_filters = filters.expand(canvas.shape) if filters is not None else None
        cutoff = sampling_cutoff(logits, mask_id=mask_id, temperature=temps, filters=row_filters)
        return CommitResult(*commit_step_kernel(logits, canvas, **rule_args, cutoff=cutoff))
    return commit_step_torch(logits, canvas, **rule_args, filters=filters)


def commit_step_torch(
    logits: torch.Tensor,
    canvas: torch.Tensor,
    *,
    mask_id: int,
    threshold: torch.Tensor,
    step: torch.Tensor,
    steps_per_block: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    block_start: torch.Tensor,
    filters: SamplingFilters | None = None,
) -> CommitResult:
    """One denoising step of the commit rule in plain torch: the definition and the fallback.

    Args:
        logits: ``[B, S, V]`` denoiser logits (logit at position ``i`` predicts position ``i``).
        canvas: ``[B, S]`` int64 canvases; ``mask_id`` marks undecided positions.
        threshold: ``[B]`` float confidence threshold γ.
        step: ``[B]`` int64 index of this step within the block (0-based).
        steps_per_block: ``[B]`` int64 step budget ``T`` of each row's block.
        temperature: ``[B]`` float sampling temperature (0 = greedy).
        seed: ``[B]`` int64 folded seeds (:func:`fold_seed`), used only where temperature > 0.
        block_start: ``[B]`` int64 absolute token position of each canvas' first position.
        filters: ``[B]`` min_p / top_k / top_p of each row (:class:`SamplingFilters`).
    """
    masked = canvas == mask_id
    positions = block_start.unsqueeze(-1) + torch.arange(canvas.shape[-1], device=canvas.device)
    row_keys = noise_row_keys(seed.unsqueeze(-1), positions, step.unsqueeze(-1))
    temps = temperature.unsqueeze(-1).expand_as(canvas)
    row_filters = filters.expand(canvas.shape) if filters is not None else None
    tokens, confidence = predict(
        logits, mask_id=mask_id, temperature=temps, row_keys=row_keys, filters=row_filters
    )
    confidence = torch.where(masked, confidence, torch.full_like(confidence, float("inf")))
    k = num_to_commit(
        confidence, masked, threshold=threshold, step=step, steps_per_block=steps_per_block
    )
    commits = select_commits(confidence, masked, k)
    return CommitResult(
        canvas=torch.where(commits, tokens, canvas),
        num_committed=commits.sum(dim=-1),
        confidence=confidence,
    )


def ar_tokens(
    logits: torch.Tensor,
    *,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    first_position: torch.Tensor,
    filters: SamplingFilters | None = None,
) -> torch.Tensor:
    """The AR token each context-tower logit row ``[R, S, V]`` predicts, exactly as ``ar`` takes it.

    Row ``r``'s logit ``i`` predicts absolute position ``first_position[r] + i``; its noise is
    keyed ``(seed, position, step 0)``, the mask id is not suppressed and row ``r``'s
    ``filters`` (``[R]``) apply, as in ``ar`` mode.
    """
    positions = first_position.unsqueeze(-1) + torch.arange(logits.shape[1], device=logits.device)
    keys = noise_row_keys(seed.unsqueeze(-1), positions, torch.zeros_like(positions))
    temps = temperature.unsqueeze(-1).expand(positions.shape)
    position_filters = filters.expand(positions.shape) if filters is not None else None
    return predict(
        logits, mask_id=None, temperature=temps, row_keys=keys, filters=position_filters
    )[0]


def accept_draft(
    draft: torch.Tensor,
    logits: torch.Tensor,
    *,
    length: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    block_start: torch.Tensor,
    filters: SamplingFilters | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative acceptance rule: what a verified draft lets a request emit.

    ``draft [R, S]`` holds, from absolute position ``block_start``, the AR token ``c`` the
    context tower already chose and the denoiser's guesses after it; only the first
    ``length[r]`` positions of row ``r`` count.  ``logits [R, S, V]`` are the context tower's
    over the draft (causal: logit ``i`` has seen ``draft[:i + 1]`` only).  The AR token after
    draft position ``i`` is recomputed from logit ``i`` (:func:`ar_tokens`); the ``k`` leading
    guesses that equal it are accepted, plus the AR token at the first mismatch (or after the
    last position).  Every emitted token is therefore the one ``ar`` mode would emit there.

    Returns:
        ``(ar [R, S] the recomputed AR tokens, accepted [R] = k)``: the row emits, after ``c``,
        ``ar[r, : k + 1]`` (which equals ``draft[r, 1 : k + 1]`` followed by ``ar[r, k]``).
    """
    ar = ar_tokens(
        logits,
        temperature=temperature,
        seed=seed,
        first_position=block_start + 1,
        filters=filters,
    )
    inside = torch.arange(draft.shape[1] - 1, device=draft.device) < (length - 1).unsqueeze(-1)
    matches = (draft[:, 1:] == ar[:, :-1]) & inside
    return ar, matches.long().cumprod(dim=-1).sum(dim=-1)

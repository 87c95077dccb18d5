"""Slot-indexed per-request TwoTower state kept by the model runner.

vLLM's persistent batch reorders and compacts its rows every step, so the runner keeps its own
table: a request gets a slot when it is first sampled and frees it when vLLM drops the request
(finished or aborted).  Everything the batched code needs is a tensor indexed by slot; the only
per-request Python object is the ``req_id -> slot`` map.
"""

from __future__ import annotations

import random
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from vllm.sampling_params import SamplingParams

from vllm_twotower.commit import SamplingFilters, fold_seed
from vllm_twotower.engine.params import ServerDefaults
from vllm_twotower.logit_adjust import LogitAdjuster, adjustments_active, pad_bad_words
from vllm_twotower.params import (
    AR_STEP,
    AUTO,
    DIFFUSION_STEP,
    DRAFT_STEP,
    MASK_DIFFUSION,
    MODES,
    SPECULATIVE,
)

MODE_ID = {name: i for i, name in enumerate(MODES)}

#: vLLM's id prefix for sample ``k`` of an ``n > 1`` request (``ParentRequest.get_child_info``).
_CHILD_PREFIX = re.compile(r"\d+_")

#: The schedule's step kinds, by code (RequestTable.schedule).
_STEP_CODES = (DIFFUSION_STEP, AR_STEP, DRAFT_STEP)

# SamplingParams treats temperatures below this as greedy.
_GREEDY_EPS = 1e-5


@dataclass
class RequestStats:
    """How a finished request was generated (reported through the worker's stats RPC)."""

    mode: str
    nfe: int  # denoiser forward passes
    blocks: int  # diffusion blocks denoised
    denoised_tokens: int  # tokens decided by the denoiser (mock_ar: one per pass)
    #: speculative: drafted tokens the context tower accepted (``blocks`` counts the drafts,
    #: one per verification step; ``nfe`` the denoiser passes that drafted them)
    accepted_tokens: int = 0
    #: auto and speculative: engine steps that emitted one AR token (``blocks`` counts the
    #: others: diffusion blocks, drafts), chosen by the load (engine/load_policy.py)
    ar_steps: int = 0
    #: auto and speculative: what each engine step did (params.DIFFUSION_STEP, AR_STEP,
    #: DRAFT_STEP), which the reference replays
    schedule: str = ""

    @property
    def tokens_per_nfe(self) -> float:
        return self.denoised_tokens / self.nfe if self.nfe else 0.0

    @property
    def accepted_per_verification(self) -> float:
        return (
            self.accepted_tokens / self.blocks if self.mode == SPECULATIVE and self.blocks else 0.0
        )

    @property
    def accepted_per_nfe(self) -> float:
        return self.accepted_tokens / self.nfe if self.mode == SPECULATIVE and self.nfe else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        """The counters and ratios; the acceptance ones only where they mean something
        (a speculative request or mode total), so other modes' entries are unchanged."""
        entry: dict[str, float | int | str] = {
            **asdict(self),
            "tokens_per_nfe": self.tokens_per_nfe,
        }
        if self.mode not in (SPECULATIVE, AUTO):
            del entry["ar_steps"], entry["schedule"]
        if self.mode != SPECULATIVE:
            del entry["accepted_tokens"]
            return entry
        return {
            **entry,
            "accepted_per_verification": self.accepted_per_verification,
            "accepted_per_nfe": self.accepted_per_nfe,
        }


def matches_request_id(internal_id: str, request_id: str) -> bool:
    """Whether the engine's ``internal_id`` belongs to the client-facing ``request_id``.

    Internal ids extend the id a client sees: the OpenAI server sends prompt ``i`` of response
    ``cmpl-X`` as ``cmpl-X-i``, the engine appends ``-<8 random chars>`` to keep ids unique, and
    with ``n > 1`` each sample ``k`` runs as ``k_<that id>``.  So one response id covers every
    internal id that, less a ``k_`` prefix, equals it or starts with it and a dash.
    """
    child = _CHILD_PREFIX.match(internal_id)
    candidates = (internal_id, internal_id[child.end() :]) if child else (internal_id,)
    return any(c == request_id or c.startswith(request_id + "-") for c in candidates)


def _accumulate(into: RequestStats, stats: RequestStats) -> None:
    into.nfe += stats.nfe
    into.blocks += stats.blocks
    into.denoised_tokens += stats.denoised_tokens
    into.accepted_tokens += stats.accepted_tokens
    into.ar_steps += stats.ar_steps


class RequestTable:
    """Per-request parameters and counters, one row per slot."""

    #: How many finished requests' stats are kept for the stats RPC.
    FINISHED_KEPT = 10_000

    def __init__(self, defaults: ServerDefaults, capacity: int = 64, seed: int = 0) -> None:
        self.defaults = defaults
        self.slot_of: dict[str, int] = {}
        self.finished: OrderedDict[str, RequestStats] = OrderedDict()
        #: Counters of finished requests per mode (the totals are their sum).
        self.finished_by_mode = {mode: RequestStats(mode, 0, 0, 0) for mode in MODES}
        self._free: list[int] = []
        # Seeds for requests that bring none.  Seeded (from vLLM's ``--seed``) because every
        # tensor-parallel rank samples its own tokens and feeds them to its next step: an
        # unseeded draw would give each rank different tokens for the same request.
        self._rng = random.Random(seed)
        self.capacity = 0
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        def extend(old: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
            new = torch.zeros(capacity, dtype=dtype)
            if old is not None:
                new[: old.shape[0]] = old
            return new

        first = self.capacity == 0
        long, f32 = torch.int64, torch.float32
        self.mode = extend(None if first else self.mode, long)
        self.block_size = extend(None if first else self.block_size, long)
        self.steps_per_block = extend(None if first else self.steps_per_block, long)
        self.threshold = extend(None if first else self.threshold, f32)
        self.temperature = extend(None if first else self.temperature, f32)
        self.seed = extend(None if first else self.seed, long)
        #: vLLM's min_p / top_k / top_p (commit.sampling_cutoff); 0, 0, 1 filter nothing
        self.top_k = extend(None if first else self.top_k, long)
        self.top_p = extend(None if first else self.top_p, torch.float64)
        self.min_p = extend(None if first else self.min_p, torch.float64)
        #: vLLM's penalties (logit_adjust.LogitAdjuster); 0, 0, 1 change nothing
        self.presence = extend(None if first else self.presence, f32)
        self.frequency = extend(None if first else self.frequency, f32)
        self.repetition = extend(None if first else self.repetition, f32)
        #: the request has structured outputs (vLLM's grammar bitmask; ar and mock_ar only)
        self.structured = extend(None if first else self.structured, torch.bool)
        #: each slot's logit_bias entries, [capacity, widest bias so far]; id -1 = unused
        width = 0 if first else self.bias_ids.shape[1]
        self.bias_ids = self._resized(None if first else self.bias_ids, capacity, width, -1)
        self.bias_values = self._resized(None if first else self.bias_values, capacity, width, 0)
        #: each slot's allowed_token_ids, [capacity, longest list so far]; id -1 = unused
        width = 0 if first else self.allowed_ids.shape[1]
        self.allowed_ids = self._resized(None if first else self.allowed_ids, capacity, width, -1)
        #: min_tokens and the stop ids it bans (vLLM's all_stop_token_ids: EOS included)
        self.min_tokens = extend(None if first else self.min_tokens, long)
        width = 0 if first else self.stop_ids.shape[1]
        self.stop_ids = self._resized(None if first else self.stop_ids, capacity, width, -1)
        #: each slot's bad words (vLLM's bad_words_token_ids), [capacity, most words so far,
        #: longest word so far], right-aligned, -1 = unused (logit_adjust.pad_bad_words)
        shape = (0, 1) if first else self.bad_words.shape[1:]
        self.bad_words = self._resized_words(None if first else self.bad_words, capacity, *shape)
        #: denoiser forward passes, blocks denoised and tokens the denoiser decided
        self.nfe = extend(None if first else self.nfe, long)
        self.blocks = extend(None if first else self.blocks, long)
        self.decided = extend(None if first else self.decided, long)
        self.accepted = extend(None if first else self.accepted, long)
        self.ar_steps = extend(None if first else self.ar_steps, long)
        #: max_tokens (its remaining budget bounds what a block can commit: load_policy)
        self.max_tokens = extend(None if first else self.max_tokens, long)
        #: auto and speculative: each slot's steps so far (codes of _STEP_CODES), and how many
        width = 0 if first else self.schedule.shape[1]
        self.schedule = self._resized(None if first else self.schedule, capacity, width, -1)
        self.schedule_len = extend(None if first else self.schedule_len, long)
        self._free.extend(range(capacity - 1, self.capacity - 1, -1))
        self.capacity = capacity

    @staticmethod
    def _resized(old: torch.Tensor | None, rows: int, width: int, fill: float) -> torch.Tensor:
        """A ``[rows, width]`` copy of ``old`` padded with ``fill`` (int64 ids or float32)."""
        dtype = torch.int64 if fill == -1 else torch.float32
        new = torch.full((rows, width), fill, dtype=dtype)
        if old is not None:
            new[: old.shape[0], : old.shape[1]] = old
        return new

    @staticmethod
    def _resized_words(
        old: torch.Tensor | None, rows: int, count: int, length: int
    ) -> torch.Tensor:
        """A ``[rows, count, length]`` copy of the bad words ``old``, still right-aligned."""
        new = torch.full((rows, count, length), -1, dtype=torch.int64)
        if old is not None:
            new[: old.shape[0], : old.shape[1], length - old.shape[2] :] = old
        return new

    def slots(self, req_ids: list[str], params: list[SamplingParams]) -> torch.Tensor:
        """Slots of ``req_ids`` (``[R]`` int64), registering requests seen for the first time."""
        slot_of = self.slot_of
        slots = [
            slot_of[req_id] if req_id in slot_of else self._add(req_id, sp)
            for req_id, sp in zip(req_ids, params, strict=True)
        ]  # one tensor at the end: per-element tensor writes cost ~4 µs each, every step
        return torch.tensor(slots, dtype=torch.int64)

    def _add(self, req_id: str, sp: SamplingParams) -> int:
        # Admission already validated the parameters (TwoTowerParamsValidator).
        params = self.defaults.resolve(sp.extra_args)
        if not self._free:
            self._grow(self.capacity * 2)
        slot = self._free.pop()
        self.slot_of[req_id] = slot
        self.mode[slot] = MODE_ID[params.mode]
        self.block_size[slot] = params.block_size
        # A speculative request's denoiser fields are those of its drafts.
        denoising = params.draft() if params.mode == SPECULATIVE else params
        self.steps_per_block[slot] = denoising.steps_per_block
        self.threshold[slot] = denoising.confidence_threshold
        temperature = sp.temperature if sp.temperature >= _GREEDY_EPS else 0.0
        self.temperature[slot] = temperature
        seed = sp.seed if sp.seed is not None else self._rng.getrandbits(64)
        self.seed[slot] = fold_seed(seed)
        self.top_k[slot] = max(sp.top_k, 0)  # vLLM: 0 and -1 both mean off
        self.top_p[slot] = sp.top_p
        self.min_p[slot] = sp.min_p
        self.presence[slot] = sp.presence_penalty
        self.frequency[slot] = sp.frequency_penalty
        self.repetition[slot] = sp.repetition_penalty
        self.structured[slot] = sp.structured_outputs is not None
        bias = sp.logit_bias or {}
        if len(bias) > self.bias_ids.shape[1]:
            self.bias_ids = self._resized(self.bias_ids, self.capacity, len(bias), -1)
            self.bias_values = self._resized(self.bias_values, self.capacity, len(bias), 0)
        self.bias_ids[slot] = -1
        self.bias_values[slot] = 0
        self.bias_ids[slot, : len(bias)] = torch.tensor([int(i) for i in bias], dtype=torch.int64)
        self.bias_values[slot, : len(bias)] = torch.tensor(list(bias.values()))
        allowed = sp.allowed_token_ids or []
        if len(allowed) > self.allowed_ids.shape[1]:
            self.allowed_ids = self._resized(self.allowed_ids, self.capacity, len(allowed), -1)
        self.allowed_ids[slot] = -1
        self.allowed_ids[slot, : len(allowed)] = torch.tensor(allowed, dtype=torch.int64)
        self.min_tokens[slot] = sp.min_tokens
        stops = sorted(sp.all_stop_token_ids) if sp.min_tokens else []
        if len(stops) > self.stop_ids.shape[1]:
            self.stop_ids = self._resized(self.stop_ids, self.capacity, len(stops), -1)
        self.stop_ids[slot] = -1
        self.stop_ids[slot, : len(stops)] = torch.tensor(stops, dtype=torch.int64)
        words = sp.bad_words_token_ids or []
        count = max(len(words), self.bad_words.shape[1])
        length = max([self.bad_words.shape[2], *map(len, words)])
        if (count, length) != self.bad_words.shape[1:]:
            self.bad_words = self._resized_words(self.bad_words, self.capacity, count, length)
        self.bad_words[slot] = pad_bad_words(words, count, length)
        self.nfe[slot] = self.blocks[slot] = self.decided[slot] = self.accepted[slot] = 0
        self.ar_steps[slot] = self.schedule_len[slot] = 0
        self.max_tokens[slot] = sp.max_tokens if sp.max_tokens is not None else 1 << 62
        return slot

    def filters(self, slots: torch.Tensor) -> SamplingFilters:
        """The sampling filters of ``slots`` (applied only where a row samples)."""
        return SamplingFilters(self.top_k[slots], self.top_p[slots], self.min_p[slots])

    def adjustments_active(self, slots: torch.Tensor) -> torch.Tensor:
        """Bool per slot: the request sets a logit bias, a penalty, allowed ids, bad words or
        min_tokens."""
        return adjustments_active(
            self.presence[slots],
            self.frequency[slots],
            self.repetition[slots],
            self.bias_ids[slots],
            self.allowed_ids[slots],
            self.min_tokens[slots],
            self.bad_words[slots],
        )

    def adjuster(
        self,
        slots: torch.Tensor,
        vocab_size: int,
        prompts: list[torch.Tensor],
        outputs: list[torch.Tensor],
    ) -> LogitAdjuster:
        """The allowed ids, bad words, bias and penalties of ``slots``, whose token histories
        are given."""
        return LogitAdjuster.build(
            vocab_size,
            prompts=prompts,
            outputs=outputs,
            presence=self.presence[slots],
            frequency=self.frequency[slots],
            repetition=self.repetition[slots],
            bias_ids=self.bias_ids[slots],
            bias_values=self.bias_values[slots],
            allowed_ids=self.allowed_ids[slots],
            min_tokens=self.min_tokens[slots],
            stop_ids=self.stop_ids[slots],
            bad_words=self.bad_words[slots],
        )

    def record_steps(self, slots: torch.Tensor, multi: torch.Tensor, auto: torch.Tensor) -> None:
        """Append what this engine step did for ``slots`` (auto and speculative rows) to their
        schedules: a block (``multi`` and ``auto``), a draft (``multi``, not ``auto``) or an
        AR token (not ``multi``, also counted in ``ar_steps``).  One tensor op per step, not
        one per row: it runs every step for every such row."""
        if not slots.numel():
            return
        needed = int(self.schedule_len[slots].max()) + 1
        if needed > self.schedule.shape[1]:
            width = max(needed, 2 * self.schedule.shape[1], 64)
            self.schedule = self._resized(self.schedule, self.capacity, width, -1)
        code = {step: _STEP_CODES.index(step) for step in _STEP_CODES}
        codes = torch.where(
            multi,
            torch.where(auto, code[DIFFUSION_STEP], code[DRAFT_STEP]),
            code[AR_STEP],
        )
        self.schedule[slots, self.schedule_len[slots]] = codes
        self.schedule_len[slots] += 1
        self.ar_steps[slots[~multi]] += 1

    def _stats_of(self, slot: int) -> RequestStats:
        codes = self.schedule[slot, : int(self.schedule_len[slot])].tolist()
        return RequestStats(
            MODES[int(self.mode[slot])],
            int(self.nfe[slot]),
            int(self.blocks[slot]),
            int(self.decided[slot]),
            int(self.accepted[slot]),
            int(self.ar_steps[slot]),
            "".join(_STEP_CODES[c] for c in codes),
        )

    def remove(self, req_id: str) -> None:
        """Free a request's slot, keeping its final counters in :attr:`finished`."""
        slot = self.slot_of.pop(req_id, None)
        if slot is None:
            return
        self._free.append(slot)
        stats = self._stats_of(slot)
        self.finished[req_id] = stats
        while len(self.finished) > self.FINISHED_KEPT:
            self.finished.popitem(last=False)
        _accumulate(self.finished_by_mode[stats.mode], stats)

    def stats(
        self, request_id: str | None = None, include_requests: bool = True
    ) -> dict[str, object]:
        """Counters per request, per mode and in total.

        They add up: the totals are the sum over ``modes``, each mode's the sum over its
        requests; ``steps_per_block`` is mask_diffusion's passes per block, and
        ``accepted_per_verification`` / ``accepted_per_nfe`` are speculative's accepted drafted
        tokens per verification step / per drafting denoiser pass.

        Requests vLLM has not dropped yet are included with their current counters: vLLM tells
        the runner about a finished request only with the next scheduled step.  ``request_id``
        keeps only the requests it names (:func:`matches_request_id`); ``include_requests=False``
        returns the totals alone, for pollers that would otherwise copy up to
        :attr:`FINISHED_KEPT` entries per call.  The totals always cover every request.
        """
        live = {r: self._stats_of(slot) for r, slot in self.slot_of.items()}
        by_mode = {m: RequestStats(m, 0, 0, 0) for m in MODES}
        for s in [*self.finished_by_mode.values(), *live.values()]:
            _accumulate(by_mode[s.mode], s)
        total = RequestStats("all", 0, 0, 0)
        for s in by_mode.values():
            _accumulate(total, s)
        diffusion, speculative, auto = by_mode[MASK_DIFFUSION], by_mode[SPECULATIVE], by_mode[AUTO]
        modes = {m: s.as_dict() for m, s in by_mode.items()}
        for entry in modes.values():
            entry.pop("schedule", None)  # a request's, not a total's
        requests: dict[str, dict[str, float | int | str]] = {}
        if include_requests:
            requests = {
                r: s.as_dict()
                for r, s in {**self.finished, **live}.items()
                if request_id is None or matches_request_id(r, request_id)
            }
        return {
            "requests": requests,
            "aggregate": {
                **total.as_dict(),
                # Per block: mask_diffusion's passes only (mock_ar's have no blocks).
                "steps_per_block": diffusion.nfe / diffusion.blocks if diffusion.blocks else 0.0,
                # Accepted guesses, per verification step and drafting pass: speculative's.
                "accepted_tokens": total.accepted_tokens,
                "accepted_per_verification": speculative.accepted_per_verification,
                "accepted_per_nfe": speculative.accepted_per_nfe,
                # The steps load-aware decoding chose (engine/load_policy.py).
                "auto_diffusion_steps": auto.blocks,
                "auto_ar_steps": auto.ar_steps,
                "speculative_drafts": speculative.blocks,
                "speculative_ar_steps": speculative.ar_steps,
                "modes": modes,
            },
        }

"""Every ``SamplingParams`` field, classified: honoured by the TwoTower engine, or refused.

The block step chooses every token (in each mode, ``ar`` included) with the commit rule
(:mod:`vllm_twotower.commit`: temperature, vLLM's ``min_p`` / ``top_k`` / ``top_p`` filters
and position-keyed Gumbel noise) over logits with vLLM's allowed ids, bad words, bias and
penalties applied (:mod:`vllm_twotower.logit_adjust`), not with vLLM's sampler; structured
outputs reach it as vLLM's grammar bitmask (``ar`` and ``mock_ar``).  What vLLM implements
*inside* its sampler or its logits processors beyond those would not be applied: instead of
silently ignoring such a field, admission refuses a request that sets it to anything but its
neutral value, with a message naming the field (HTTP 400 from the server), and so it does for
a field honoured only in other modes.

What vLLM applies outside the sampler (stop conditions in the scheduler, detokenisation and
streaming in the front end, prompt logprobs from the context tower's logits) is honoured, and
so are output logprobs, which the block step reports itself (:mod:`.logprobs`).

:data:`FIELDS` holds every field of the installed ``SamplingParams``;
``tests/engine/test_sampling_fields.py`` fails when vLLM adds one that is not classified here,
so a new knob can never be silently ignored.  ``docs/engine-design.md`` §5 renders this table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vllm_twotower.params import AR, AUTO, MASK_DIFFUSION, MOCK_AR, MODES

HONOURED, REFUSED, INTERNAL = "honoured", "refused", "internal"


def _unset(value: Any) -> bool:
    return value is None


def _empty(value: Any) -> bool:
    return not value


def _equals(*neutral: Any) -> Callable[[Any], bool]:
    return lambda value: value in neutral


@dataclass(frozen=True)
class Field:
    """How the engine treats one ``SamplingParams`` field."""

    handling: str  # HONOURED, REFUSED or INTERNAL
    where: str  # who applies it, or why it cannot be applied yet
    neutral: Callable[[Any], bool] = _unset  # the values that change nothing
    #: HONOURED: the modes that apply it; a request of another mode setting it is refused
    modes: tuple[str, ...] = MODES
    why_not: str = ""  # HONOURED in some modes: why the others refuse it

    def refused_in(self, mode: str | None) -> bool:
        """Whether a non-neutral value is refused for a request of ``mode`` (``None``: any)."""
        if self.handling == HONOURED:
            return mode is not None and mode not in self.modes
        return self.handling == REFUSED


_ADJUST = "logit_adjust.LogitAdjuster, on the logits the commit rule chooses from"
#: The modes that apply the LogitAdjuster: a speculative step verifies a whole draft at once,
#: where each position would need its own history (penalties, min_tokens); not built yet.
_ADJUSTED_MODES = (MASK_DIFFUSION, MOCK_AR, AR, AUTO)
_NOT_SPECULATIVE = (
    "a speculative verification scores a whole draft in one pass, whose positions would each "
    'need their own history; use "mode": "ar", whose output speculative reproduces'
)


def _adjusted(where: str, neutral: Callable[[Any], bool]) -> Field:
    return Field(HONOURED, where, neutral, modes=_ADJUSTED_MODES, why_not=_NOT_SPECULATIVE)


FIELDS: Mapping[str, Field] = {
    # Honoured: the commit rule, the scheduler, the front end, the context tower.
    "n": Field(HONOURED, "vLLM's front end (n child requests, each with its own noise seed)"),
    "temperature": Field(HONOURED, "the commit rule (0 = greedy)"),
    "seed": Field(HONOURED, "the commit rule's position-keyed noise"),
    "top_p": Field(HONOURED, "the commit rule's filter of the sampled distribution"),
    "top_k": Field(HONOURED, "the commit rule's filter of the sampled distribution"),
    "min_p": Field(HONOURED, "the commit rule's filter of the sampled distribution"),
    "presence_penalty": _adjusted(_ADJUST, _equals(0.0)),
    "frequency_penalty": _adjusted(_ADJUST, _equals(0.0)),
    "repetition_penalty": _adjusted(_ADJUST, _equals(1.0)),
    "logit_bias": _adjusted(_ADJUST, _empty),
    "allowed_token_ids": _adjusted(_ADJUST, _empty),
    "min_tokens": _adjusted(_ADJUST + " (stop ids banned while the output is shorter)", _equals(0)),
    "max_tokens": Field(HONOURED, "the scheduler, inside a committed block"),
    "stop": Field(HONOURED, "the detokenizer, inside a committed block"),
    "stop_token_ids": Field(HONOURED, "the scheduler, inside a committed block"),
    "ignore_eos": Field(HONOURED, "the scheduler"),
    "include_stop_str_in_output": Field(HONOURED, "the detokenizer"),
    "repetition_detection": Field(HONOURED, "the scheduler's stop check, token by token"),
    "logprobs": Field(
        HONOURED, "the block step: each token's log-probability in the pass that committed it"
    ),
    "logprob_token_ids": Field(
        HONOURED, "the block step: the named ids' values in the pass that committed each token"
    ),
    "prompt_logprobs": Field(HONOURED, "vLLM's prompt-logprob path over the context tower"),
    "prompt_logprob_token_ids": Field(HONOURED, "vLLM's prompt-logprob path"),
    "prompt_logprob_start": Field(HONOURED, "vLLM's prompt-logprob path"),
    "flat_logprobs": Field(HONOURED, "the output format of prompt logprobs"),
    "detokenize": Field(HONOURED, "the front end"),
    "skip_special_tokens": Field(HONOURED, "the detokenizer"),
    "spaces_between_special_tokens": Field(HONOURED, "the detokenizer"),
    "output_kind": Field(HONOURED, "the front end (streaming deltas: one per committed block)"),
    "stream_interval": Field(HONOURED, "the front end"),
    "skip_clone": Field(HONOURED, "the front end"),
    "skip_reading_prefix_cache": Field(HONOURED, "the KV-cache manager"),
    "extra_args": Field(HONOURED, "the TwoTower parameters (mode, γ, steps, block size)"),
    "bad_words": Field(
        HONOURED,
        _ADJUST + " (a word's last id banned where the output ends with its other ids)",
        _empty,
        modes=(AR, MOCK_AR),
        why_not="a diffusion block commits its positions out of order and a speculative step "
        "several at once, so the tokens before a position are not known when it is chosen; "
        'use "mode": "ar" (or "mock_ar")',
    ),
    "structured_outputs": Field(
        HONOURED,
        "vLLM's grammar bitmask on the logits of the one token a step chooses",
        modes=(AR, MOCK_AR),
        why_not="a diffusion block commits tokens out of order, and a speculative step several "
        "at once, which the grammar's one-token bitmask cannot constrain; use "
        '"mode": "ar" (or "mock_ar")',
    ),
    # Refused unless neutral: applied inside vLLM's sampler or its logits processors.
    "thinking_token_budget": Field(REFUSED, "vLLM's reasoning logits processor"),
    "watermarking": Field(REFUSED, "Model Runner V2's sampler (TwoTower runs on V1)"),
    "trace_decode_token_ids": Field(REFUSED, "Model Runner V2's trace replay"),
    "routed_experts_prompt_start": Field(
        REFUSED, "vLLM's routed-experts capture, which the TwoTower MoE does not record", _equals(0)
    ),
    # Set by vLLM itself from the tokenizer and other fields, never by a client.
    "output_text_buffer_length": Field(INTERNAL, "derived from stop strings"),
    "_eos_token_id": Field(INTERNAL, "the tokenizer"),
    "_all_stop_token_ids": Field(INTERNAL, "derived from stop_token_ids and EOS"),
    "_bad_words_token_ids": Field(INTERNAL, "derived from bad_words"),
    "_watermarking_skipped": Field(INTERNAL, "derived from watermarking"),
}


def refused_fields(values: Mapping[str, Any], mode: str | None = None) -> list[str]:
    """The fields refused for ``mode`` (``None``: refused in every mode) that ``values`` sets
    to something other than a neutral value."""
    return [
        name
        for name, field in FIELDS.items()
        if field.refused_in(mode) and name in values and not field.neutral(values[name])
    ]


def refusal_message(name: str, value: Any, mode: str | None = None) -> str:
    """Why a request (or a server default) setting ``name`` is refused."""
    field = FIELDS[name]
    if field.handling == HONOURED:
        return (
            f"{name}={value!r} is not supported in mode {mode!r} by the TwoTower engine "
            f"(only in {', '.join(repr(m) for m in field.modes)}): {field.why_not} "
            "(see docs/engine-design.md §5)"
        )
    return (
        f"{name}={value!r} is not supported by the TwoTower engine: it is applied by "
        f"{field.where}; leave {name} unset (see docs/engine-design.md §5)"
    )


def check_sampling_params(sampling_params: Any, mode: str) -> None:
    """Raise ``ValueError`` naming the first field a request of ``mode`` may not set."""
    values = {name: getattr(sampling_params, name, None) for name in FIELDS}
    refused = refused_fields(values, mode)
    if refused:
        raise ValueError(refusal_message(refused[0], values[refused[0]], mode))

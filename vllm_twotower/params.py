"""Per-request TwoTower generation parameters and their validation.

Requests choose the generation mode and the diffusion knobs through
``SamplingParams.extra_args`` (the OpenAI server's ``vllm_xargs``).  Server-wide defaults come
from the checkpoint's ``generation_config.json`` (:class:`~vllm_twotower.config.DiffusionDefaults`).
The reference implementation and the engine both resolve requests through
:func:`resolve_params`, so a value is valid or invalid in the same way everywhere, and an invalid
one raises a ``ValueError`` that names the field.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from vllm_twotower.config import DiffusionDefaults

MASK_DIFFUSION, MOCK_AR, AR, SPECULATIVE = "mask_diffusion", "mock_ar", "ar", "speculative"
#: Load-aware decoding (issue #24): each engine step, a diffusion block or an AR token,
#: whichever the engine's cost model says commits more tokens per second for the batch; a block
#: only on the request's block grid, where ``mask_diffusion``'s blocks start.
AUTO = "auto"
MODES = (MASK_DIFFUSION, MOCK_AR, AR, SPECULATIVE, AUTO)
#: What one engine step did for a request, as its schedule records it (``twotower_stats``)
#: and the reference replays it: a diffusion block, an AR token, a speculative draft.
DIFFUSION_STEP, AR_STEP, DRAFT_STEP = "d", "a", "s"
#: The steps each mode's requests may take (mock-AR's are its own); the first is the one taken
#: when the engine does not adapt the schedule to the load.
MODE_STEPS = {
    MASK_DIFFUSION: (DIFFUSION_STEP,),
    AR: (AR_STEP,),
    SPECULATIVE: (DRAFT_STEP, AR_STEP),
    AUTO: (DIFFUSION_STEP, AR_STEP),
}
#: The ``extra_args`` keys this plugin reads.
EXTRA_ARG_KEYS = (
    "mode",
    "confidence_threshold",
    "steps_per_block",
    "block_size",
    "draft_threshold",
)
#: Keys starting with this prefix (any case) are reserved for the plugin: an unknown one is an
#: error, not ignored.  Other keys belong to vLLM (``kv_transfer_params``, ...) or to other
#: extensions and are left alone, unless they are a near miss of a plugin key (a typo such as
#: ``steps_per_blocks`` or ``blockSize``), which is refused too: silently generating with the
#: default instead of what the client meant is worse than an error.
PLUGIN_KEY_PREFIX = "twotower"
#: ``steps_per_block`` may be at most this times the model's (trained) block size.  Every
#: denoising step decides at least one position, so a block never takes more passes than it has
#: positions and any larger budget behaves like one of ``block_size``; the bound only keeps
#: values in a range every consumer (int64 tensors, the kernels) holds.
MAX_STEPS_PER_BLOCK_FACTOR = 4


def max_steps_per_block(max_block_size: int) -> int:
    """The largest ``steps_per_block`` a request may ask for (documented in README.md)."""
    return MAX_STEPS_PER_BLOCK_FACTOR * max_block_size


@dataclass(frozen=True)
class TwoTowerParams:
    """How one request is generated."""

    mode: str = MASK_DIFFUSION
    block_size: int = 16
    steps_per_block: int = 16
    confidence_threshold: float = 0.8
    #: Speculative mode: the confidence threshold γ of the denoiser's draft.  ``None`` (the
    #: default) drafts in one pass with every position decided; a value lets the commit rule
    #: take up to ``block_size`` passes, deciding the positions that beat γ each pass.
    draft_threshold: float | None = None

    @property
    def uses_denoiser(self) -> bool:
        return self.mode != AR

    def draft(self) -> TwoTowerParams:
        """The diffusion parameters a speculative request drafts its blocks with."""
        if self.draft_threshold is None:
            return replace(self, steps_per_block=1, confidence_threshold=1.0)
        return replace(
            self, steps_per_block=self.block_size, confidence_threshold=self.draft_threshold
        )


def _show(value: Any) -> str:
    """``repr`` of a client value for an error message, cut short (values can be huge)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _int_field(name: str, value: Any, low: int, high: int) -> int:
    """An integer (an integral float is accepted) in ``[low, high]``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer()))
    ):
        raise ValueError(f"{name} must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {_show(value)}")
    return int(value)


def _threshold_field(name: str, value: Any) -> float:
    """A finite number in ``(0, 1]`` (a confidence threshold γ)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0.0 < value <= 1.0  # before isfinite, which overflows on huge ints
        or not math.isfinite(value)
    ):
        raise ValueError(f"{name} must be a finite number in (0, 1], got {_show(value)}")
    return float(value)


def _normalized(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


_NORMALIZED_KEYS = {_normalized(k): k for k in EXTRA_ARG_KEYS}


def _check_keys(args: Mapping[Any, Any]) -> None:
    """Refuse unknown keys in the plugin's namespace (see :data:`PLUGIN_KEY_PREFIX`)."""
    for key in args:
        if key in EXTRA_ARG_KEYS:
            continue
        if not isinstance(key, str):
            raise ValueError(f"extra_args keys must be strings, got {_show(key)}")
        norm = _normalized(key)
        if norm.startswith(PLUGIN_KEY_PREFIX):
            raise ValueError(
                f"unknown TwoTower parameter {_show(key)}: the {PLUGIN_KEY_PREFIX!r} prefix is "
                f"reserved; known parameters are {list(EXTRA_ARG_KEYS)}"
            )
        close = difflib.get_close_matches(norm, _NORMALIZED_KEYS, n=1, cutoff=0.85)
        if close:
            raise ValueError(
                f"unknown parameter {_show(key)}: did you mean {_NORMALIZED_KEYS[close[0]]!r}?"
            )


def resolve_params(
    extra_args: Mapping[str, Any] | None, defaults: DiffusionDefaults, max_block_size: int
) -> TwoTowerParams:
    """Validate a request's ``extra_args`` against the model and fill in the defaults.

    Every field is checked with both bounds whatever the mode (a value the mode does not use
    is still stored by the engine), so nothing admitted here can fail later in the worker.

    Raises:
        ValueError: naming the offending field, for an unknown mode, a threshold outside
            (0, 1] or not finite (``confidence_threshold``, ``draft_threshold``), a step
            count outside [1, :func:`max_steps_per_block`], a
            block size outside [1, ``max_block_size``] (the block size the denoiser was
            trained with), a non-integer count, or an unknown key in the plugin's namespace
            (:func:`_check_keys`).
    """
    args = dict(extra_args or {})
    _check_keys(args)
    mode = args.get("mode", MASK_DIFFUSION)
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {_show(mode)}")
    threshold = _threshold_field(
        "confidence_threshold", args.get("confidence_threshold", defaults.confidence_threshold)
    )
    draft_threshold = args.get("draft_threshold")
    if draft_threshold is not None:
        draft_threshold = _threshold_field("draft_threshold", draft_threshold)
    return TwoTowerParams(
        mode=mode,
        block_size=_int_field(
            "block_size", args.get("block_size", defaults.block_size), 1, max_block_size
        ),
        steps_per_block=_int_field(
            "steps_per_block",
            args.get("steps_per_block", defaults.steps_per_block),
            1,
            max_steps_per_block(max_block_size),
        ),
        confidence_threshold=threshold,
        draft_threshold=draft_threshold,
    )

"""Request-parameter plumbing between vLLM and :mod:`vllm_twotower.params`.

The rule for what a request may ask for lives in :func:`vllm_twotower.params.resolve_params`
(shared with the reference).  This module adds what only the engine needs:

* :class:`ServerDefaults`: the server-wide defaults (``generation_config.json``, overridable per
  server through ``--hf-overrides``, e.g. ``{"default_mode": "ar", "confidence_threshold": 0.9}``);
* :class:`TwoTowerParamsValidator`: a logits processor that changes nothing and exists for its
  ``validate_params`` hook, which vLLM runs on every request at admission in the API-server /
  ``LLM`` process, turning a ``ValueError`` into HTTP 400 before the request reaches the engine.
  The config hook installs it for the TwoTower architecture only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import LogitsProcessor

from vllm_twotower.config import DiffusionDefaults
from vllm_twotower.engine.load_policy import StepCostModel
from vllm_twotower.engine.sampling_fields import check_sampling_params
from vllm_twotower.params import AUTO, MODES, TwoTowerParams, resolve_params

#: ``--hf-overrides`` keys that change server defaults (besides the DiffusionDefaults fields).
DEFAULT_MODE_KEY = "default_mode"
#: ``false`` turns load-aware decoding off (issue #24): speculative always drafts, auto is
#: refused; for people who benchmark the fixed modes.
LOAD_AWARE_KEY = "load_aware"
#: Fixed step-cost coefficients (engine/load_policy.TERMS, seconds) instead of learned ones:
#: load-aware decisions then depend on the requests only (tests, reproducible benchmarks).
COST_MODEL_KEY = "auto_cost_model"


@dataclass(frozen=True)
class ServerDefaults:
    """What a request gets for the fields it leaves out, and the model's limits."""

    diffusion: DiffusionDefaults
    max_block_size: int
    mode: str = "mask_diffusion"
    #: Why ``max_block_size`` is the bound (config_hook.block_size_reason), told to a request
    #: that asks for more.
    block_size_reason: str = ""
    #: Load-aware decoding (engine/load_policy.py) on, and its fixed cost model, if any.
    load_aware: bool = True
    cost_model: tuple[float, ...] | None = None

    @classmethod
    def from_hf_config(
        cls,
        diffusion: DiffusionDefaults,
        max_block_size: int,
        hf_config: Any,
        *,
        block_size_reason: str = "",
    ) -> ServerDefaults:
        """Apply ``--hf-overrides`` (attributes of the HF config) on top of the checkpoint's."""
        overrides = {
            name: getattr(hf_config, name)
            for name in ("block_size", "steps_per_block", "confidence_threshold")
            if getattr(hf_config, name, None) is not None
        }
        defaults = cls(
            replace(diffusion, **overrides), max_block_size, block_size_reason=block_size_reason
        )
        mode = getattr(hf_config, DEFAULT_MODE_KEY, None)
        if mode is not None:
            defaults = replace(defaults, mode=mode)
        load_aware = getattr(hf_config, LOAD_AWARE_KEY, True)
        if not isinstance(load_aware, bool):
            raise ValueError(f"{LOAD_AWARE_KEY} must be true or false, got {load_aware!r}")
        cost_model = getattr(hf_config, COST_MODEL_KEY, None)
        if cost_model is not None:
            cost_model = tuple(float(c) for c in cost_model)
            StepCostModel(cost_model)  # raises ValueError saying what is wrong
        defaults = replace(defaults, load_aware=load_aware, cost_model=cost_model)
        # The defaults must themselves be a valid request.
        defaults.resolve(None)
        return defaults

    def resolve(self, extra_args: dict[str, Any] | None) -> TwoTowerParams:
        """A request's parameters; raises ``ValueError`` naming the first invalid field."""
        args = {"mode": self.mode, **(extra_args or {})}
        size = args.get("block_size")
        if (
            isinstance(size, (int, float))
            and not isinstance(size, bool)
            and size > self.max_block_size
        ):
            raise ValueError(
                f"block_size must be at most {self.max_block_size}, got {size}: "
                + (self.block_size_reason or "the model's largest block")
            )
        params = resolve_params(args, self.diffusion, self.max_block_size)
        if params.mode == AUTO and not self.load_aware:
            raise ValueError(
                f'mode "auto" needs load-aware decoding, which this server turned off '
                f'(--hf-overrides {{"{LOAD_AWARE_KEY}": false}}); choose another mode'
            )
        return params


# The API-server process learns its model's defaults from the config hook (which runs where the
# VllmConfig is built), because ``validate_params`` is a classmethod without the config.
_admission_defaults: ServerDefaults | None = None


def set_admission_defaults(defaults: ServerDefaults) -> None:
    """Record the defaults :class:`TwoTowerParamsValidator` checks requests against."""
    global _admission_defaults
    _admission_defaults = defaults


class TwoTowerParamsValidator(LogitsProcessor):
    """No-op logits processor whose ``validate_params`` rejects invalid TwoTower parameters."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        # The block step chooses tokens with the commit rule, not vLLM's sampler, so what
        # only that sampler implements is refused rather than silently ignored.
        if _admission_defaults is not None:
            params = _admission_defaults.resolve(sampling_params.extra_args)
        else:  # a process without the hook's defaults still checks what it can
            params = resolve_params(sampling_params.extra_args, DiffusionDefaults(), 1 << 30)
        check_sampling_params(sampling_params, params.mode)

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Any) -> None:
        pass


__all__ = ["MODES", "ServerDefaults", "TwoTowerParamsValidator", "set_admission_defaults"]

"""Per-architecture engine defaults for TwoTower checkpoints.

vLLM runs ``MODELS_CONFIG_MAP[architecture].verify_and_update_config`` early in
``VllmConfig.__post_init__`` — before the platform fills in ``worker_cls`` and before async
scheduling is decided — in every process that builds a config (the ``LLM`` / API-server
process).  It is where in-tree models set their own defaults (NemotronH forces a float32 Mamba
SSM cache there), so it is where TwoTower sets its: only for this architecture, leaving every
other model served from the same environment untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vllm.logger import init_logger

from vllm_twotower import vllm_internals as vi
from vllm_twotower.config import DiffusionDefaults, TwoTowerConfig
from vllm_twotower.engine.params import (
    ServerDefaults,
    TwoTowerParamsValidator,
    set_admission_defaults,
)
from vllm_twotower.engine.sampling_fields import refusal_message, refused_fields

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger(f"vllm.{__name__}")  # shown with vLLM's log configuration

#: Why the TwoTower engine needs vLLM's V1 model runner (docs/engine-design.md §3, §11).
V1_ONLY = (
    "the TwoTower engine runs on vLLM's V1 model runner: its block step replaces the V1 "
    "runner's sampling step, and a Model Runner V2 port (a ModelState) does not exist yet"
)

VALIDATOR_FQCN = f"{TwoTowerParamsValidator.__module__}:{TwoTowerParamsValidator.__name__}"


def worker_cls_name() -> str:
    """The worker that installs the TwoTower model runner on this platform."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "vllm_twotower.engine.worker.TwoTowerCPUWorker"
    return "vllm_twotower.engine.worker.TwoTowerGPUWorker"


def read_diffusion_defaults(model: str) -> DiffusionDefaults:
    """The checkpoint's diffusion defaults (``generation_config.json``), validated.

    A model that is not a local directory (a hub id) gets the published operating point.
    """
    if not (Path(model) / "config.json").is_file():
        return DiffusionDefaults()
    return TwoTowerConfig.from_pretrained(model).diffusion


def max_block_size(hf_config: object) -> int:
    """The block size the denoiser was trained with (= the Mamba chunk size)."""
    for name in ("chunk_size", "mamba_chunk_size"):
        value = getattr(hf_config, name, None)
        if value:
            return int(value)
    return DiffusionDefaults().block_size


def refuse_unsupported_generation_defaults(defaults: dict[str, object]) -> None:
    """Refuse server-wide sampling defaults the engine would not apply.

    vLLM's server fills every request's unset sampling fields from the checkpoint's
    ``generation_config.json`` (``--generation-config auto``); a default such as ``top_p`` would
    make every request fail admission, so it is refused once, at start-up.
    """
    refused = refused_fields(defaults)
    if refused:
        name = refused[0]
        raise ValueError(
            f"generation_config: {refusal_message(name, defaults[name])}. Serve with "
            "--generation-config vllm, or remove it from generation_config.json"
        )


class TwoTowerConfigHook(vi.nemotron_h_config_hook()):
    """``MODELS_CONFIG_MAP`` entry for ``NemotronHTwoTowerForCausalLM``."""

    @classmethod
    def verify_and_update_config(cls, vllm_config: VllmConfig) -> None:
        vi.check_vllm_version()
        # float32 Mamba SSM cache, as for every NemotronH (the denoiser is seeded from it).
        super().verify_and_update_config(vllm_config)
        model_config = vllm_config.model_config
        parallel = vllm_config.parallel_config
        if parallel.worker_cls == "auto":
            parallel.worker_cls = worker_cls_name()
        # The runner decision is made here, once, for every process of the engine.
        vi.pin_v1_model_runner(vllm_config, V1_ONLY)
        # The block step returns several tokens per request; the async output path assumes one.
        scheduler = vllm_config.scheduler_config
        if scheduler.async_scheduling:
            raise ValueError("TwoTower does not support async scheduling (--async-scheduling)")
        scheduler.async_scheduling = False
        if vllm_config.speculative_config is not None:
            raise ValueError(
                "TwoTower commits blocks itself; speculative decoding is not supported"
            )
        procs = list(model_config.logits_processors or [])
        if VALIDATOR_FQCN not in procs:
            model_config.logits_processors = [*procs, VALIDATOR_FQCN]
        refuse_unsupported_generation_defaults(model_config.get_diff_sampling_param())
        if model_config.logprobs_mode != "raw_logprobs":
            raise ValueError(
                f"--logprobs-mode {model_config.logprobs_mode} is not supported by the TwoTower "
                "engine: it reports raw_logprobs (the untempered log-probability each token was "
                "committed with; docs/engine-design.md §5)"
            )
        hf_config = model_config.hf_config
        defaults = ServerDefaults.from_hf_config(
            read_diffusion_defaults(model_config.model), max_block_size(hf_config), hf_config
        )
        set_admission_defaults(defaults)
        logger.info("TwoTower engine defaults: %s", defaults)

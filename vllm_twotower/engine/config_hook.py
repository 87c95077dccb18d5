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
from vllm.model_executor.models.config import NemotronHForCausalLMConfig

from vllm_twotower.config import DiffusionDefaults, TwoTowerConfig
from vllm_twotower.engine.params import (
    ServerDefaults,
    TwoTowerParamsValidator,
    set_admission_defaults,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger(f"vllm.{__name__}")  # shown with vLLM's log configuration

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


#: Why ``--pipeline-parallel-size`` > 1 is refused (vLLM would refuse it too, for want of
#: ``SupportsPP``, in words that do not say why).
PIPELINE_PARALLEL_ERROR = (
    "TwoTower does not support pipeline parallelism (--pipeline-parallel-size {size}): every "
    "engine step runs the denoiser's iterative passes (up to steps_per_block per block) over "
    "all layers, each layer reading the context tower's KV cache / Mamba state of the same "
    "layer index, while vLLM's pipeline parallelism hands activations between stages once per "
    "step. Split the model across nodes with --tensor-parallel-size instead."
)


def max_block_size(hf_config: object) -> int:
    """The block size the denoiser was trained with (= the Mamba chunk size)."""
    for name in ("chunk_size", "mamba_chunk_size"):
        value = getattr(hf_config, name, None)
        if value:
            return int(value)
    return DiffusionDefaults().block_size


class TwoTowerConfigHook(NemotronHForCausalLMConfig):
    """``MODELS_CONFIG_MAP`` entry for ``NemotronHTwoTowerForCausalLM``."""

    @classmethod
    def verify_and_update_config(cls, vllm_config: VllmConfig) -> None:
        # float32 Mamba SSM cache, as for every NemotronH (the denoiser is seeded from it).
        super().verify_and_update_config(vllm_config)
        model_config = vllm_config.model_config
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size > 1:
            raise ValueError(PIPELINE_PARALLEL_ERROR.format(size=parallel.pipeline_parallel_size))
        if parallel.worker_cls == "auto":
            parallel.worker_cls = worker_cls_name()
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
        hf_config = model_config.hf_config
        defaults = ServerDefaults.from_hf_config(
            read_diffusion_defaults(model_config.model), max_block_size(hf_config), hf_config
        )
        set_admission_defaults(defaults)
        logger.info("TwoTower engine defaults: %s", defaults)

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
from typing import TYPE_CHECKING, Any

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


#: Why ``--pipeline-parallel-size`` > 1 is refused (vLLM would refuse it too, for want of
#: ``SupportsPP``, in words that do not say why).
PIPELINE_PARALLEL_ERROR = (
    "TwoTower does not support pipeline parallelism (--pipeline-parallel-size {size}): every "
    "engine step runs the denoiser's iterative passes (up to steps_per_block per block) over "
    "all layers, each layer reading the context tower's KV cache / Mamba state of the same "
    "layer index, while vLLM's pipeline parallelism hands activations between stages once per "
    "step. Split the model across nodes with --tensor-parallel-size instead."
)


#: ``--hf-overrides`` key with which a server opts in to blocks larger than the trained one.
MAX_BLOCK_SIZE_KEY = "max_block_size"


def max_block_size(hf_config: object, trained_block_size: int | None = None) -> int:
    """The largest ``block_size`` a request may ask for.

    By default the block the checkpoint's denoiser was trained with: ``trained_block_size``
    (``generation_config.json``'s ``block_size``; NVIDIA's published 16 when absent).  Not the
    Mamba ``chunk_size``: that is a kernel tiling parameter (128 in the real config), and the
    published measurements show quality collapsing on blocks the model never saw (64).  A server
    may opt in to larger blocks with ``--hf-overrides '{"max_block_size": N}'``.
    """
    opt_in = getattr(hf_config, MAX_BLOCK_SIZE_KEY, None)
    if opt_in is not None:
        if isinstance(opt_in, bool) or not isinstance(opt_in, int) or opt_in < 1:
            raise ValueError(
                f"--hf-overrides {MAX_BLOCK_SIZE_KEY} must be a positive integer, got {opt_in!r}"
            )
        return opt_in
    return trained_block_size or DiffusionDefaults().block_size


def block_size_reason(hf_config: object, bound: int) -> str:
    """Why ``bound`` is the largest block: the text a refused request's 400 carries."""
    if getattr(hf_config, MAX_BLOCK_SIZE_KEY, None) is not None:
        return f"this server allows blocks of at most {bound} (--hf-overrides {MAX_BLOCK_SIZE_KEY})"
    return (
        f"the checkpoint's denoiser was trained with blocks of {bound} and its quality drops "
        f"on larger ones; a server may allow them with "
        f"--hf-overrides '{{\"{MAX_BLOCK_SIZE_KEY}\": N}}'"
    )


def server_defaults(model_config: Any) -> ServerDefaults:
    """The defaults and limits every request is resolved against, in admission and in the
    runner alike (so a request admitted in the API process can never fail in a worker)."""
    hf_config = model_config.hf_config
    trained = read_diffusion_defaults(model_config.model)
    bound = max_block_size(hf_config, trained.block_size)
    return ServerDefaults.from_hf_config(
        trained, bound, hf_config, block_size_reason=block_size_reason(hf_config, bound)
    )


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
        if parallel.pipeline_parallel_size > 1:
            raise ValueError(PIPELINE_PARALLEL_ERROR.format(size=parallel.pipeline_parallel_size))
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
        defaults = server_defaults(model_config)
        set_admission_defaults(defaults)
        logger.info("TwoTower engine defaults: %s", defaults)

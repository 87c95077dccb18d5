"""vLLM plugin serving NVIDIA Nemotron-Labs-TwoTower block-wise diffusion language models."""

from __future__ import annotations

__version__ = "0.1.0"

ARCHITECTURE = "NemotronHTwoTowerForCausalLM"


def register() -> None:
    """vLLM ``general_plugins`` entry point; idempotent (vLLM calls it in every process).

    Registers the architecture with vLLM's model registry (lazy string form, so importing the
    plugin does not import the model) and its per-architecture config hook, which installs the
    TwoTower worker/runner and engine defaults for this architecture only.
    """
    from vllm import ModelRegistry

    from vllm_twotower.engine.config_hook import TwoTowerConfigHook
    from vllm_twotower.vllm_internals import register_config_hook

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            ARCHITECTURE, "vllm_twotower.model.twotower:NemotronHTwoTowerForCausalLM"
        )
    register_config_hook(ARCHITECTURE, TwoTowerConfigHook)

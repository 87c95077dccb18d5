"""Pure-PyTorch TwoTower reference implementation: the oracle the vLLM path is held to."""

from vllm_twotower.reference.blocks import ContextState
from vllm_twotower.reference.generate import GenerationResult, SamplingSpec, generate
from vllm_twotower.reference.model import TwoTowerModel

__all__ = ["ContextState", "GenerationResult", "SamplingSpec", "TwoTowerModel", "generate"]

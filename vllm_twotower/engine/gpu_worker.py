"""CUDA worker and runner (imported only where the config hook selects them).

Not yet run on a GPU (no CUDA vLLM in CI or on the device machine): AR mode needs nothing
device-specific; the denoising modes read the GPU backends' dense KV view through
:class:`~vllm_twotower.engine.context_reader.ContextReader`, so far checked only on CPU tensors.
The runner's denoising loop keeps its per-row tensors on ``runner.device`` and the request
table on the CPU, moving between them at the loop's edges only.
"""

from __future__ import annotations

from typing import Any

from vllm_twotower import vllm_internals as vi
from vllm_twotower.engine.runner import TwoTowerRunnerMixin
from vllm_twotower.engine.worker import TwoTowerWorkerMixin


class TwoTowerGPUModelRunner(TwoTowerRunnerMixin, vi.gpu_model_runner_class()):
    """vLLM's V1 GPU model runner with the TwoTower block step."""

    def __init__(self, vllm_config: Any, device: Any) -> None:
        super().__init__(vllm_config, device)
        self._twotower_init()


class TwoTowerGPUWorker(TwoTowerWorkerMixin, vi.gpu_worker_class()):
    """vLLM's CUDA worker, building :class:`TwoTowerGPUModelRunner` in its runner factory."""

    def _make_model_runner(self) -> TwoTowerGPUModelRunner:
        self.require_v1_runner()
        return TwoTowerGPUModelRunner(self.vllm_config, self.device)

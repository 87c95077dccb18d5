"""GPU worker installing the TwoTower runner (imported only on CUDA platforms).

Not yet run on a GPU (no CUDA vLLM in CI or on the device machine): AR mode needs nothing
device-specific; the denoising modes read the GPU backends' dense KV view through
:class:`~vllm_twotower.engine.context_reader.ContextReader`, so far checked only on CPU tensors.
The runner's denoising loop keeps its per-row tensors on ``runner.device`` and the request
table on the CPU, moving between them at the loop's edges only.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_twotower.engine.runner import TwoTowerRunnerMixin


class TwoTowerGPUModelRunner(TwoTowerRunnerMixin, GPUModelRunner):
    """vLLM's V1 GPU model runner with the TwoTower block step."""

    def __init__(self, vllm_config: Any, device: Any) -> None:
        super().__init__(vllm_config, device)
        self._twotower_init()


class TwoTowerGPUWorker(Worker):
    """vLLM's GPU worker running :class:`TwoTowerGPUModelRunner`."""

    def init_device(self) -> None:
        super().init_device()
        self.model_runner = TwoTowerGPUModelRunner(self.vllm_config, self.device)

    def twotower_stats(
        self, request_id: str | None = None, include_requests: bool = True
    ) -> dict[str, object]:
        """See :meth:`vllm_twotower.engine.worker.TwoTowerCPUWorker.twotower_stats`."""
        return self.model_runner.tt_requests.stats(request_id, include_requests)

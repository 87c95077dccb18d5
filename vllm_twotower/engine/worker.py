"""Workers that install the TwoTower model runner (selected by the config hook's ``worker_cls``).

vLLM's workers construct their model runner inside ``init_device`` with no factory hook, so
these subclasses let the stock ``init_device`` run and then replace the runner before the model
is loaded (nothing has been allocated on the stock runner that the replacement needs).
"""

from __future__ import annotations

import torch
from vllm.v1.worker.cpu_worker import CPUWorker


class TwoTowerCPUWorker(CPUWorker):
    """vLLM's CPU worker running :class:`~vllm_twotower.engine.runner.TwoTowerCPUModelRunner`."""

    def init_device(self) -> None:
        super().init_device()
        from vllm_twotower.engine.runner import TwoTowerCPUModelRunner

        self.model_runner = TwoTowerCPUModelRunner(self.vllm_config, torch.device("cpu"))

    def twotower_stats(
        self, request_id: str | None = None, include_requests: bool = True
    ) -> dict[str, object]:
        """Denoiser passes and tokens per pass of finished requests, and their totals.

        Public through vLLM's ``LLM.collective_rpc("twotower_stats")`` and, in the API server,
        through :mod:`vllm_twotower.engine.stats_endpoint`.  The arguments filter the
        per-request part (:meth:`~vllm_twotower.engine.requests.RequestTable.stats`).
        """
        return self.model_runner.tt_requests.stats(request_id, include_requests)


def __getattr__(name: str) -> type:
    # The GPU worker imports CUDA-only modules; build it only where it is asked for.
    if name == "TwoTowerGPUWorker":
        from vllm_twotower.engine.gpu_worker import TwoTowerGPUWorker

        return TwoTowerGPUWorker
    raise AttributeError(name)

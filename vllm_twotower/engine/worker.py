"""Workers that run the TwoTower model runner (selected by the config hook's ``worker_cls``).

The TwoTower runner is a subclass of vLLM's V1 model runner (Model Runner V2 has no hook for a
step that commits a whole block yet; ``docs/engine-design.md`` §11).  The config hook pins
vLLM's runner switch to V1 for every process of the engine; the workers check that decision
again where they build the runner, so a V2 runner can never be half-installed.

* CUDA (:mod:`vllm_twotower.engine.gpu_worker`): vLLM's worker builds its runner in the
  factory hook ``_make_model_runner()``, which the TwoTower worker overrides.
* CPU (here): vLLM's ``CPUWorker.init_device`` constructs ``CPUModelRunner`` by name, with no
  factory hook, so the TwoTower worker replaces the runner right after it, before the model
  is loaded (the discarded runner has allocated only its host-side input buffers).
"""

from __future__ import annotations

import torch

from vllm_twotower import vllm_internals as vi
from vllm_twotower.engine.config_hook import V1_ONLY
from vllm_twotower.engine.step_planner import engine_stats

V2_REFUSED = (
    f"{V1_ONLY}, but this worker was configured for Model Runner V2; unset "
    f"{vi.V2_RUNNER_SWITCH} or set it to 0 (docs/engine-design.md)"
)


class TwoTowerWorkerMixin:
    """What both TwoTower workers add to vLLM's: the V1 check and the stats RPC."""

    def require_v1_runner(self) -> None:
        """Refuse to build a runner when vLLM decided on Model Runner V2."""
        if vi.worker_uses_v2_runner(self):
            raise RuntimeError(V2_REFUSED)

    def twotower_stats(
        self, request_id: str | None = None, include_requests: bool = True
    ) -> dict[str, object]:
        """Denoiser passes and tokens per pass of finished requests, and their totals.

        Public through vLLM's ``LLM.collective_rpc("twotower_stats")`` and, in the API server,
        through :mod:`vllm_twotower.engine.stats_endpoint`.  The arguments filter the
        per-request part (:meth:`~vllm_twotower.engine.requests.RequestTable.stats`).
        """
        runner = self.model_runner
        return engine_stats(runner.tt_requests, runner.tt_planner, request_id, include_requests)


class TwoTowerCPUWorker(TwoTowerWorkerMixin, vi.cpu_worker_class()):
    """vLLM's CPU worker running :class:`~vllm_twotower.engine.runner.TwoTowerCPUModelRunner`."""

    def init_device(self) -> None:
        self.require_v1_runner()
        super().init_device()
        from vllm_twotower.engine.runner import TwoTowerCPUModelRunner

        vi.replace_model_runner(self, TwoTowerCPUModelRunner(self.vllm_config, torch.device("cpu")))


def __getattr__(name: str) -> type:
    # The GPU worker's module imports CUDA-side vLLM modules; import it only where asked for.
    if name == "TwoTowerGPUWorker":
        from vllm_twotower.engine.gpu_worker import TwoTowerGPUWorker

        return TwoTowerGPUWorker
    raise AttributeError(name)

"""``RayCpuPlatform``: vLLM's CPU platform, schedulable by Ray on a custom resource.

Imported by vLLM only after :func:`~vllm_twotower.multinode.plugin.platform_plugin` answered.
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from vllm_twotower.multinode.plugin import requested_resource


class RayCpuPlatform(CpuPlatform):
    """vLLM's CPU platform with a Ray device key.

    ``ray_device_key`` is the resource vLLM's Ray executor reserves one unit of per worker
    (placement-group bundles ``{key: 1}``) and looks the worker's ids up by.  Collectives use
    shared memory only among ranks on one Ray node (see :mod:`.communicator`).
    """

    ray_device_key: str = requested_resource() or ""

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        return "vllm_twotower.multinode.communicator.NodeLocalShmCommunicator"

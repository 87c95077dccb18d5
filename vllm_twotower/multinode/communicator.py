"""CPU collectives that use shared memory only among ranks on one node.

vLLM's CPU communicator decides on shared-memory all-reduce from a name its ranks agree on,
which says nothing about where they run: two Ray workers on different nodes agreed, and it
worked only because both nodes shared one host (3.5x slower than gloo there, see
``docs/multinode.md``); on two hosts the ranks would wait on two unrelated segments.
:class:`NodeLocalShmCommunicator` adds the missing condition: every rank of the group is on
the same Ray node (the same host, outside Ray).  Otherwise it uses torch.distributed (gloo).

The same collective tells each rank its place on its node (local rank, workers there), which a
Ray worker needs to size its intra-op threads (:mod:`.threads`): this is the first code of the
platform that runs in every worker with that knowledge, and it runs before the model does.
"""

from __future__ import annotations

import logging
import socket
import sys

import torch.distributed as dist

from vllm_twotower.multinode.threads import size_worker_threads
from vllm_twotower.vllm_internals import cpu_communicator_with_shm_condition

logger = logging.getLogger(f"vllm.{__name__}")


def node_identity() -> str:
    """This process's node: its Ray node id inside a Ray job, else its host name."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return f"ray:{ray.get_runtime_context().get_node_id()}"
    return f"host:{socket.gethostname()}"


def ranks_share_a_node(communicator: object) -> bool:
    """Whether every rank of the communicator's group runs on this rank's node (collective).

    On the way, a Ray worker sizes its threads from its place among the group's ranks on its
    node (ranks in order, as vLLM's Ray executor numbers local ranks; the group is the TP
    group, which is every worker of the engine: the platform has no PP, and Ray DP runs one
    engine per DP rank).
    """
    group = communicator.cpu_group  # type: ignore[attr-defined]
    nodes: list[str | None] = [None] * dist.get_world_size(group)
    mine = node_identity()
    dist.all_gather_object(nodes, mine, group=group)
    size_worker_threads(nodes[: dist.get_rank(group)].count(mine), nodes.count(mine))
    if len(set(nodes)) == 1:
        return True
    logger.info(
        "Group %s spans %d nodes: no shared-memory collectives, torch.distributed (gloo)",
        communicator.unique_name,  # type: ignore[attr-defined]
        len(set(nodes)),
    )
    return False


NodeLocalShmCommunicator = cpu_communicator_with_shm_condition(ranks_share_a_node)
NodeLocalShmCommunicator.__name__ = NodeLocalShmCommunicator.__qualname__ = (
    "NodeLocalShmCommunicator"
)
NodeLocalShmCommunicator.__module__ = __name__

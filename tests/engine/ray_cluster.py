"""A two-node Ray cluster on loopback for the Ray tests, and their engine arguments.

The cluster is :func:`vllm_twotower.multinode.loopback.serving_cluster`; this module only
exports the driver's variables while it runs (the engine core and the API server are
started from this process and inherit them) and removes Ray's session files afterwards.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.conftest import ENGINE_KWARGS
from vllm_twotower.multinode.loopback import LoopbackCluster, serving_cluster

#: The shared engine arguments, tensor-parallel over the two Ray nodes.
RAY_ENGINE_KWARGS = {**ENGINE_KWARGS, "tensor_parallel_size": 2,
                     "distributed_executor_backend": "ray"}  # fmt: skip


@contextlib.contextmanager
def running_cluster() -> Iterator[LoopbackCluster]:
    """Start the cluster, point this process's children at it, stop it and clean up."""
    # Ray's socket paths must stay short (AF_UNIX), so not under pytest's deep tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="ttray-", dir="/tmp"))
    try:
        with serving_cluster(temp_dir) as cluster, pytest.MonkeyPatch.context() as env:
            for name, value in cluster.driver_env().items():
                env.setenv(name, value)
            yield cluster
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)

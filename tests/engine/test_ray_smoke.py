"""Smoke (default suite): the embedded checkpoint served with TP=2 over two Ray nodes.

A two-node Ray cluster on loopback (two raylets, so the two workers are on different nodes
and talk over TCP and gloo), one ``LLM(distributed_executor_backend="ray",
tensor_parallel_size=2)``, every mode greedy plus a sampled request, each token-exact with
the reference (which ``test_parity`` holds equal to the single-process engine).  The slow
suite (``test_ray_multinode``) adds the server, the single-process engine side by side and a
killed worker.

Both nodes start with torch's libgomp in ``LD_PRELOAD``, as vLLM's CPU install guide asks and
as vLLM's CPU platform sets in any process that has built an engine: a preloaded libgomp sizes
its thread pool at process start, which is how Ray workers came to run one thread per host core
and serve at 2-3 % of ``mp`` (``docs/multinode.md``, "Measured").  Each worker must run the
threads its ``VLLM_CPU_OMP_THREADS_BIND`` entry names.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch

from tests.engine.ray_cluster import RAY_ENGINE_KWARGS, running_cluster
from tests.engine.test_parity import Case, engine_outputs, prompt_ids, reference_outputs
from vllm_twotower.checkpoints import DEFAULT_CHECKPOINT
from vllm_twotower.multinode.threads import BIND_ENV, worker_thread_count
from vllm_twotower.reference import TwoTowerModel

CASES = [
    Case(9, {"mode": "mask_diffusion"}),
    Case(40, {"mode": "ar"}, max_tokens=24),
    Case(70, {"mode": "mock_ar"}, max_tokens=20),
    Case(20, {"block_size": 8}, temperature=0.8, seed=5),
]


def test_tp2_over_two_ray_nodes_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm import LLM

    libgomp = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*"))
    if libgomp:  # what vLLM's CPU platform preloads; the nodes inherit this environment
        monkeypatch.setenv("LD_PRELOAD", libgomp[0])
    # Lets collective_rpc ship the thread-count probe below to the workers.
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    prompts = [prompt_ids(c.prompt_len, 900 + i) for i, c in enumerate(CASES)]
    expected = reference_outputs(TwoTowerModel.from_pretrained(DEFAULT_CHECKPOINT), prompts, CASES)
    with running_cluster() as cluster:
        llm = LLM(model=str(DEFAULT_CHECKPOINT), **RAY_ENGINE_KWARGS)
        try:
            got = engine_outputs(llm, prompts, CASES)
            threads = llm.collective_rpc(lambda _worker: torch.get_num_threads())
        finally:
            llm.llm_engine.engine_core.shutdown()
    assert [g[0] for g in got] == expected
    binds = sorted(env[BIND_ENV] for env in cluster.node_env)  # ranks fill nodes in any order
    if "nobind" not in binds:
        assert sorted(threads) == sorted(worker_thread_count(0, 1, bind) for bind in binds)

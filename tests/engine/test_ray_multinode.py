"""Serving over two Ray nodes (slow): server (TP=2, DP=2) and ``LLM`` (TP=2) against the
single-process engine, and a killed worker.

One two-node loopback cluster (see ``ray_cluster.py``) serves the embedded checkpoint, one
engine at a time (each takes both nodes' resource units):

1. ``python -m vllm.entrypoints.openai.api_server --distributed-executor-backend ray
   --tensor-parallel-size 2`` answers every mode, token for token as one process does, and so
   does data parallelism over Ray (``--data-parallel-backend ray --data-parallel-size 2``, one
   engine per node);
2. ``LLM(distributed_executor_backend="ray", tensor_parallel_size=2)`` runs ``test_parity``'s
   mixed batch (all modes, sampled and greedy, long prefills) token for token as one process
   does, with one worker on each node;
3. SIGKILL to the worker on the second node during a ``generate``: the engine fails with
   ``EngineDeadError`` (then at once on every later call) instead of hanging.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.engine.conftest import ENGINE_KWARGS
from tests.engine.ray_cluster import RAY_ENGINE_KWARGS, running_cluster
from tests.engine.test_parity import CASES, Case, engine_outputs, prompt_ids
from tests.engine.test_server import ENGINE_FLAGS, PROMPT, complete, free_port, running_server
from vllm_twotower.checkpoints import DEFAULT_CHECKPOINT
from vllm_twotower.multinode.loopback import LoopbackCluster

pytestmark = pytest.mark.slow

MODES = ("mask_diffusion", "ar", "mock_ar")
PARITY_PROMPTS = [prompt_ids(c.prompt_len, i) for i, c in enumerate(CASES)]
SERVER_CASES = [Case(len(PROMPT), {"mode": mode}, max_tokens=20) for mode in MODES]


def shut_down(llm: object) -> None:
    """Stop an ``LLM``'s engine core (and with it the Ray workers) before the next engine."""
    llm.llm_engine.engine_core.shutdown()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def single_process() -> dict[str, list]:
    """The single-process engine's outputs for every request this module sends."""
    from vllm import LLM

    llm = LLM(model=str(DEFAULT_CHECKPOINT), **ENGINE_KWARGS)
    try:
        return {
            "parity": engine_outputs(llm, PARITY_PROMPTS, CASES),
            "server": engine_outputs(llm, [PROMPT] * len(SERVER_CASES), SERVER_CASES),
        }
    finally:
        shut_down(llm)


@pytest.fixture(scope="module")
def cluster(single_process: dict[str, list]) -> Iterator[LoopbackCluster]:
    with running_cluster() as started:
        yield started


#: Server flags per Ray layout: TP=2 (one worker per node); DP=2 (one engine per node; vLLM
#: puts every DP rank on the master node unless --data-parallel-size-local says otherwise).
RAY_LAYOUTS = {
    "tp2": ["--distributed-executor-backend", "ray", "--tensor-parallel-size", "2"],
    "dp2": ["--data-parallel-backend", "ray", "--data-parallel-size", "2",
            "--data-parallel-size-local", "1"],
}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(RAY_LAYOUTS, reverse=True))
def test_server_over_ray_matches_single_process(
    cluster: LoopbackCluster, single_process: dict[str, list], tmp_path: Path, layout: str
) -> None:
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(DEFAULT_CHECKPOINT), "--host", "127.0.0.1", "--port", str(free_port()),
        *ENGINE_FLAGS, *RAY_LAYOUTS[layout],
    ]  # fmt: skip
    server = running_server(cmd, tmp_path / "server.log", dict(os.environ))
    # Every mode twice, all at once (with DP=2 the requests spread over both engines).
    with server as base, ThreadPoolExecutor(2 * len(MODES)) as pool:
        responses = list(pool.map(
            lambda mode: complete(base, vllm_xargs={"mode": mode}, return_token_ids=True),
            [*MODES, *MODES],
        ))  # fmt: skip
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    got = [[r.json()["choices"][0]["token_ids"]] for r in responses]
    assert got == single_process["server"] * 2  # PROMPT, greedy, 20 tokens: SERVER_CASES


@pytest.fixture(scope="module")
def ray_llm(cluster: LoopbackCluster) -> Iterator[object]:
    from vllm import LLM

    llm = LLM(model=str(DEFAULT_CHECKPOINT), **RAY_ENGINE_KWARGS)
    yield llm
    shut_down(llm)


def test_llm_over_ray_matches_single_process(
    ray_llm: object, cluster: LoopbackCluster, single_process: dict[str, list]
) -> None:
    # One worker on each node: the second one is reached over TCP (message queue) and gloo.
    assert [len(cluster.processes(node, "RayWorkerProc")) for node in (0, 1)] == [1, 1]
    got = engine_outputs(ray_llm, PARITY_PROMPTS, CASES)
    for case, engine, ray in zip(CASES, single_process["parity"], got, strict=True):
        assert ray == engine, case


def test_killed_worker_fails_the_engine_instead_of_hanging(
    ray_llm: object, cluster: LoopbackCluster
) -> None:
    from vllm import SamplingParams
    from vllm.v1.engine.exceptions import EngineDeadError

    (worker,) = cluster.processes(1, "RayWorkerProc")
    long_run = SamplingParams(max_tokens=600, ignore_eos=True, extra_args={"mode": "ar"})
    prompts = [{"prompt_token_ids": prompt_ids(30, 50 + i)} for i in range(32)]
    outcome: list[BaseException | None] = []

    def generate() -> None:
        try:
            ray_llm.generate(prompts, long_run)  # type: ignore[attr-defined]
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    time.sleep(3)  # let the generate get under way (not an assertion on time)
    assert thread.is_alive(), "the generate finished before the worker could be killed"
    os.kill(worker, signal.SIGKILL)
    thread.join(timeout=600)  # a hang guard only
    assert not thread.is_alive(), "generate hung after its worker was killed"
    assert isinstance(outcome[0], EngineDeadError), outcome
    with pytest.raises(EngineDeadError):
        ray_llm.generate(prompts[:1], long_run)  # type: ignore[attr-defined]

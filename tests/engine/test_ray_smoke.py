"""Smoke (default suite): the embedded checkpoint served with TP=2 over two Ray nodes.

A two-node Ray cluster on loopback (two raylets, so the two workers are on different nodes
and talk over TCP and gloo), one ``LLM(distributed_executor_backend="ray",
tensor_parallel_size=2)``, every mode greedy plus a sampled request, each token-exact with
the reference (which ``test_parity`` holds equal to the single-process engine).  The slow
suite (``test_ray_multinode``) adds the server, the single-process engine side by side and a
killed worker.
"""

from __future__ import annotations

from tests.engine.ray_cluster import RAY_ENGINE_KWARGS, running_cluster
from tests.engine.test_parity import Case, engine_outputs, prompt_ids, reference_outputs
from vllm_twotower.checkpoints import DEFAULT_CHECKPOINT
from vllm_twotower.reference import TwoTowerModel

CASES = [
    Case(9, {"mode": "mask_diffusion"}),
    Case(40, {"mode": "ar"}, max_tokens=24),
    Case(70, {"mode": "mock_ar"}, max_tokens=20),
    Case(20, {"block_size": 8}, temperature=0.8, seed=5),
]


def test_tp2_over_two_ray_nodes_matches_reference() -> None:
    from vllm import LLM

    prompts = [prompt_ids(c.prompt_len, 900 + i) for i, c in enumerate(CASES)]
    expected = reference_outputs(TwoTowerModel.from_pretrained(DEFAULT_CHECKPOINT), prompts, CASES)
    with running_cluster():
        llm = LLM(model=str(DEFAULT_CHECKPOINT), **RAY_ENGINE_KWARGS)
        try:
            got = engine_outputs(llm, prompts, CASES)
        finally:
            llm.llm_engine.engine_core.shutdown()
    assert [g[0] for g in got] == expected

"""Tensor parallelism (TP=2, two CPU workers): every mode still equals the reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.engine.conftest import ENGINE_KWARGS
from tests.engine.test_parity import Case, engine_outputs, prompt_ids, reference_outputs
from vllm_twotower.reference import TwoTowerModel

pytestmark = pytest.mark.slow


def noise_seeds(worker: object) -> list[int]:
    """Every slot's noise seed in a worker's request table (run on each rank by collective_rpc)."""
    return worker.model_runner.tt_requests.seed.tolist()  # type: ignore[attr-defined]


def test_tp2_matches_reference(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm import LLM

    # One OpenMP thread per worker, on separate cores (vLLM refuses to guess on one NUMA node).
    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}|{cores[-1]}")
    # Lets collective_rpc ship this test's function (noise_seeds) to the workers.
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    llm = LLM(model=str(tiny_checkpoint), tensor_parallel_size=2, **ENGINE_KWARGS)
    cases = [Case(1, {}), Case(40, {"mode": "ar"}), Case(90, {"mode": "mock_ar"}, max_tokens=12),
             Case(70, {"block_size": 8}, temperature=0.8, seed=3)]  # fmt: skip
    prompts = [prompt_ids(c.prompt_len, 700 + i) for i, c in enumerate(cases)]
    expected = reference_outputs(TwoTowerModel.from_pretrained(tiny_checkpoint), prompts, cases)
    got = engine_outputs(llm, prompts, cases)
    assert [g[0] for g in got] == expected

    # Sampled requests without a seed: each rank draws their noise seeds itself (and samples its
    # own tokens from them), so the draws must agree across ranks.
    from vllm import SamplingParams

    llm.generate(["x", "y"], SamplingParams(max_tokens=4, temperature=0.8))
    rank0, rank1 = llm.collective_rpc(noise_seeds)
    assert rank0 == rank1 and len(set(rank0)) > 1

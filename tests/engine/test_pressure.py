"""KV-cache pressure and aborts: outputs stay exact under preemption, aborts free the cache.

The engine here gets a deliberately small number of cache blocks, so a batch of long requests
cannot all stay resident and vLLM preempts (and later recomputes) some of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.conftest import ENGINE_KWARGS
from tests.engine.test_parity import (
    Case,
    check_engine_stats,
    engine_generate,
    engine_outputs,
    engine_schedules,
    prompt_ids,
    reference_results,
)
from vllm_twotower.reference import TwoTowerModel

NUM_BLOCKS = 8  # about 750 tokens: two or three of the requests below at a time


def metric(llm, name: str) -> float:
    return sum(getattr(m, "value", 0) or 0 for m in llm.get_metrics() if m.name.startswith(name))


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path):
    from vllm import LLM

    kwargs = {**ENGINE_KWARGS, "num_gpu_blocks_override": NUM_BLOCKS, "max_model_len": 512}
    engine = LLM(model=str(tiny_checkpoint), disable_log_stats=False, **kwargs)
    yield engine
    del engine


def test_preemption_keeps_outputs_exact_and_stats_consistent(llm, tiny_checkpoint: Path) -> None:
    modes = ["mask_diffusion", "ar", "mock_ar", "speculative"] * 2
    cases = [Case(100 + 7 * i, {"mode": m}, max_tokens=100) for i, m in enumerate(modes)]
    # Small custom block sizes, whose counters the issue #17 soak saw disagree with the output.
    cases += [Case(60 + b, {"block_size": b, "steps_per_block": 3}, max_tokens=21) for b in (3, 5)]
    # auto (issue #24): its schedule survives preemption and recomputation (replayed below).
    cases += [Case(90 + 9 * i, {"mode": "auto"}, max_tokens=80) for i in range(2)]
    prompts = [prompt_ids(c.prompt_len, 300 + i) for i, c in enumerate(cases)]
    outs = engine_generate(llm, prompts, cases)
    model = TwoTowerModel.from_pretrained(tiny_checkpoint)
    expected = reference_results(model, prompts, cases, schedules=engine_schedules(llm, outs))
    for case, exp, out in zip(cases, expected, outs, strict=True):
        assert list(out.outputs[0].token_ids) == exp.output_ids, case
    names = sorted({m.name for m in llm.get_metrics()})
    assert metric(llm, "vllm:num_preemptions") > 0, f"no preemption happened ({names})"
    # Preempted and recomputed requests still count each pass and block once.
    check_engine_stats(llm, cases, outs)


def test_abort_mid_block_frees_its_cache(llm) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=200, extra_args={"block_size": 16})
    engine.add_request("victim", TokensPrompt(prompt_token_ids=prompt_ids(90, 7)), params)
    produced = 0
    while produced == 0:  # run until the first block has been committed
        for out in engine.step():
            produced = len(out.outputs[0].token_ids)
    assert 0 < produced < 200
    engine.abort_request(["victim"])
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()  # one more step publishes the freed-cache stats
    assert metric(llm, "vllm:kv_cache_usage_perc") == 0.0
    # The engine still serves, with the freed blocks.
    (out,) = engine_outputs(llm, [prompt_ids(50, 8)], [Case(50, {}, max_tokens=20)])
    assert len(out[0]) == 20

"""Timing an offline ``LLM.generate`` call together with the denoiser work it caused.

The main job and the benchmarks both need "this wave took so long and so many denoiser passes":
the passes live in the workers' request tables, so they are read through the plugin's
``twotower_stats`` RPC before and after the call, and the difference is the wave's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vllm import LLM, RequestOutput, SamplingParams


@dataclass(frozen=True)
class TimedWave:
    """One ``generate`` call: its outputs, wall time, denoiser passes, diffusion blocks (or
    speculative drafts) and accepted drafted tokens."""

    outputs: list[RequestOutput]
    seconds: float
    nfe: int
    blocks: int
    accepted: int = 0

    @property
    def tokens(self) -> int:
        """Output tokens of the first completion of every request."""
        return sum(len(o.outputs[0].token_ids) for o in self.outputs)


def _aggregate(llm: LLM) -> dict[str, Any]:
    # Rank 0's table: its sampled tokens are the ones the scheduler commits.
    return llm.collective_rpc("twotower_stats", kwargs={"include_requests": False})[0]["aggregate"]


def timed_generate(
    llm: LLM, prompts: Sequence[Any], params: SamplingParams | Sequence[SamplingParams]
) -> TimedWave:
    """``llm.generate(prompts, params)``, timed, with the denoiser passes and blocks it took."""
    before = _aggregate(llm)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = _aggregate(llm)
    delta = {key: after[key] - before[key] for key in ("nfe", "blocks", "accepted_tokens")}
    return TimedWave(outputs, seconds, delta["nfe"], delta["blocks"], delta["accepted_tokens"])

"""Every benchmark runs once in its smoke configuration, so none can break silently.

No timing is asserted: these only check that the scripts run to completion and report results.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE_RUNS = {
    "block_alignment": ["benchmarks/block_alignment.py", "--smoke"],  # prints only
    "calibration": ["benchmarks/calibration.py", "--smoke", "--no-write"],
    "context_scaling": ["benchmarks/context_scaling.py", "--smoke"],  # prints only
    "kernels": ["benchmarks/kernels.py", "--smoke", "--no-write"],
    "quality": ["benchmarks/quality.py", "--smoke"],  # writes to a temporary folder
    "quality_long": ["benchmarks/quality.py", "--smoke", "--workload", "long"],
    # starts the OpenAI server on loopback, runs vllm bench serve against it, stops it
    "serve": ["benchmarks/serve.py", "--smoke", "--modes", "mask_diffusion", "ar", "speculative"],
    "pareto": ["benchmarks/pareto.py", "--smoke", "--no-write"],  # plot to a temporary folder
    "pareto_long": ["benchmarks/pareto.py", "--smoke", "--no-write", "--workload", "long"],
    "teacher_forced_blocks": ["benchmarks/teacher_forced_blocks.py", "--smoke"],  # prints only
    "throughput": ["benchmarks/throughput.py", "--smoke"],  # prints only
    "throughput_long": ["benchmarks/throughput.py", "--smoke", "--workload", "long"],
    "pass_cost": ["benchmarks/pass_cost.py", "--smoke"],  # tiny sizes on the CPU
}


#: Scripts that start servers, engines or a Ray cluster each; slow suite.
SLOW_SMOKE_RUNS = {
    "soak": ["benchmarks/soak.py", "--smoke"],  # 4 streaming clients for 20 s
    "fuzz": ["benchmarks/fuzz.py", "--smoke"],  # 3 hostile batches while good requests run
    # three engines, one over a two-node Ray cluster on loopback
    "multinode": ["benchmarks/multinode.py", "--smoke"],  # prints only
    "lm_eval_tasks": ["benchmarks/lm_eval_tasks.py", "--smoke"],  # one server, lm-eval
}


@pytest.mark.parametrize("name", sorted(SMOKE_RUNS))
def test_benchmark_smoke(name: str) -> None:
    run_smoke(SMOKE_RUNS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_SMOKE_RUNS))
def test_slow_benchmark_smoke(name: str) -> None:
    run_smoke(SLOW_SMOKE_RUNS[name])


def run_smoke(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip(), "the benchmark printed no results"

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
    "calibration": ["benchmarks/calibration.py", "--smoke", "--no-write"],
    "context_scaling": ["benchmarks/context_scaling.py", "--smoke"],  # prints only
    "kernels": ["benchmarks/kernels.py", "--smoke", "--no-write"],
    "quality": ["benchmarks/quality.py", "--smoke"],  # writes to a temporary folder
    # starts the OpenAI server on loopback, runs vllm bench serve against it, stops it
    "serve": ["benchmarks/serve.py", "--smoke", "--no-write"],
    "pareto": ["benchmarks/pareto.py", "--smoke", "--no-write"],  # plot to a temporary folder
    "throughput": ["benchmarks/throughput.py", "--smoke"],  # prints only
    "pass_cost": ["benchmarks/pass_cost.py", "--smoke"],  # tiny sizes on the CPU
}


@pytest.mark.parametrize("name", sorted(SMOKE_RUNS))
def test_benchmark_smoke(name: str) -> None:
    result = subprocess.run(
        [sys.executable, *SMOKE_RUNS[name]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip(), "the benchmark printed no results"

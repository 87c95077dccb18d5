"""Checkpoints shipped inside the package (the embedded default)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent

#: A tiny *random* TwoTower checkpoint in the real layout (``make_tiny --seed 0``), for tests
#: that need a model whose weights mean nothing (commit-rule ties, shape checks).
TINY_RANDOM = _HERE / "tiny-random"

#: The small *trained* TwoTower model (``python -m vllm_twotower.train --out … --seed 0``): a
#: context tower trained as an AR model on the synthetic tasks and a denoiser trained with the
#: MDLM objective on top of it; its quality is in ``docs/quality.md``.
TWOTOWER_TASKS = _HERE / "twotower-tasks"

#: The small trained model of the long-answer families (``python -m vllm_twotower.train --workload
#: long …``), the same architecture as ``twotower-tasks``: a second checkpoint because retraining
#: one model on both sets does not fit the one-hour CPU budget (``docs/quality.md``).
TWOTOWER_LONG = _HERE / "twotower-long"

#: What the main job, the examples and the benchmarks load when no checkpoint is named.
DEFAULT_CHECKPOINT = TWOTOWER_TASKS

#: The checkpoint a benchmark loads for a workload (``--workload``) when none is named.
WORKLOAD_CHECKPOINTS: dict[str, Path] = {"short": DEFAULT_CHECKPOINT, "long": TWOTOWER_LONG}

#: ``LLM(...)`` arguments the main job, examples and benchmarks use for the embedded checkpoint.
#: ``dtype``: the checkpoint is float32, which vLLM downcasts to bfloat16 by default; on CPUs
#: without native bfloat16 (AVX2 only) that makes this model about 2.5× slower, and the
#: reference the engine is compared with runs in float32.  ``gpu_memory_utilization``: on CPU it
#: is the share of host memory vLLM reserves for its caches; the model needs a few MB, and
#: vLLM's default (92 %) fails beside other processes.
EMBEDDED_ENGINE_ARGS: dict[str, object] = {
    "dtype": "float32",
    "max_model_len": 512,
    "enforce_eager": True,
    "gpu_memory_utilization": 0.1,
    "seed": 0,
}

"""Engine-test settings: the engine arguments the tests share (the checkpoint is ../conftest).

Starting a CPU vLLM engine takes tens of seconds, so each test module shares one ``LLM``
(module-scoped fixture) and packs its cases into as few ``generate`` calls as it can.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

#: Engine arguments shared by the engine tests: small scheduler chunks so long prompts are
#: prefilled over several steps, float32 so the reference comparison is exact.
ENGINE_KWARGS = {
    "enforce_eager": True,
    "dtype": "float32",
    "max_model_len": 1024,
    "max_num_batched_tokens": 64,
    "max_num_seqs": 16,
    "gpu_memory_utilization": 0.05,
    "seed": 0,
}

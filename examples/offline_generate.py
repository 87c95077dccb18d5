"""Generate with a TwoTower checkpoint through vLLM's ``LLM``, mixing modes in one batch.

    python examples/offline_generate.py CHECKPOINT_DIR

With the package installed, ``LLM(model=...)`` needs no TwoTower-specific flag: the plugin
registers the architecture and its engine defaults.  Per-request knobs go in ``extra_args``.
"""

from __future__ import annotations

import sys
import time

from vllm import LLM, SamplingParams


def main() -> None:
    checkpoint = sys.argv[1]
    llm = LLM(model=checkpoint, max_model_len=2048)
    prompts = ["copy(QWERTY)=", "sort(DCBA)=", "rev(XYZ)="]  # task formats of twotower-tasks
    params = [
        SamplingParams(max_tokens=64, temperature=0.0),  # mask_diffusion, server defaults
        SamplingParams(
            max_tokens=64,
            temperature=0.0,
            extra_args={
                "mode": "mask_diffusion",
                "confidence_threshold": 0.9,
                "steps_per_block": 8,
                "block_size": 16,
            },
        ),
        SamplingParams(max_tokens=64, temperature=0.7, seed=1, extra_args={"mode": "ar"}),
    ]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    for out in outputs:
        print(repr(out.prompt), "->", repr(out.outputs[0].text))
    print(f"{tokens} tokens in {elapsed:.2f}s ({tokens / elapsed:.1f} tok/s)")
    # Denoiser passes and tokens per pass, per finished request and in total.
    print(llm.collective_rpc("twotower_stats")[0]["aggregate"])


if __name__ == "__main__":  # vLLM on CPU spawns processes
    main()

"""The main job: serve the embedded default checkpoint through vLLM in every mode, side by side.

    python -m vllm_twotower.demo [--checkpoint DIR] [--num-prompts K] [--max-new-tokens N]

Prompts come from the synthetic task corpus' test split.  One offline ``LLM`` engine runs the
same prompts as ``mask_diffusion``, ``mock_ar`` and ``ar`` requests (per-request
``extra_args``) and prints, per mode, a few completions, exact-match accuracy, throughput and
the denoiser passes (NFE) with tokens per pass, read from the plugin's stats RPC.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_twotower.checkpoints import DEFAULT_CHECKPOINT, EMBEDDED_ENGINE_ARGS
from vllm_twotower.data import accuracy_by_family, generate_split
from vllm_twotower.params import MODES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--show", type=int, default=4, help="completions printed per mode")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams  # imported late: `--help` needs no engine

    from vllm_twotower.engine.offline import timed_generate

    llm = LLM(model=str(args.checkpoint), **EMBEDDED_ENGINE_ARGS)
    examples = generate_split("test", args.num_prompts, seed=0)
    prompts = [e.prompt for e in examples]
    print(f"checkpoint: {args.checkpoint}, {len(prompts)} prompts, greedy")
    print("(arithmetic answers are written least-significant digit first: 347+58= -> 504)")
    for mode in MODES:
        params = SamplingParams(
            max_tokens=args.max_new_tokens, temperature=0.0, extra_args={"mode": mode}
        )
        wave = timed_generate(llm, prompts, params)
        texts = [o.outputs[0].text for o in wave.outputs]
        tokens, elapsed, nfe = wave.tokens, wave.seconds, wave.nfe
        accuracy = accuracy_by_family(examples, texts)["all"]
        per_pass = f"{tokens / nfe:.2f} tokens per denoiser pass" if nfe else "no denoiser"
        print(
            f"\n== {mode}: {tokens} tokens in {elapsed:.2f}s ({tokens / elapsed:.1f} tok/s), "
            f"exact match {100 * accuracy:.1f}%, {nfe} denoiser passes, {per_pass}"
        )
        for example, text in list(zip(examples, texts, strict=True))[: args.show]:
            print(f"  {example.prompt!r} -> {text!r}  (expected {example.answer!r})")


if __name__ == "__main__":  # vLLM on CPU spawns its engine processes
    main()

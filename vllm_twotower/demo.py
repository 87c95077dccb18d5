"""The main job: generate with the embedded default checkpoint in every mode and report speed.

    python -m vllm_twotower.demo [--checkpoint DIR] [--max-new-tokens N] [--num-prompts K]

Prompts come from the synthetic task corpus' test split.  Until the vLLM engine path lands this
runs the pure-PyTorch reference implementation; it prints each completion, the denoiser passes
(NFE), tokens per pass and throughput per mode.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vllm_twotower.checkpoints import DEFAULT_CHECKPOINT
from vllm_twotower.data import generate_split, load_tokenizer
from vllm_twotower.params import MODES, TwoTowerParams
from vllm_twotower.reference import SamplingSpec, TwoTowerModel, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=4)
    args = parser.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = TwoTowerModel.from_pretrained(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint)
    examples = generate_split("test", args.num_prompts, seed=0)
    prompts = [tokenizer.encode(e.prompt).ids for e in examples]
    defaults = model.config.diffusion
    print(f"checkpoint: {args.checkpoint} (layers {model.config.pattern})")
    for mode in MODES:
        params = TwoTowerParams(
            mode=mode,
            block_size=defaults.block_size,
            steps_per_block=defaults.steps_per_block,
            confidence_threshold=defaults.confidence_threshold,
        )
        start = time.perf_counter()
        results = generate(model, prompts, params, SamplingSpec(args.max_new_tokens))
        elapsed = time.perf_counter() - start
        tokens = sum(len(r.output_ids) for r in results)
        nfe = sum(r.nfe for r in results)
        per_pass = f"{tokens / nfe:.2f} tokens/pass" if nfe else "no denoiser passes"
        print(
            f"\n== {mode}: {tokens} tokens in {elapsed:.2f}s ({tokens / elapsed:.1f} tok/s), "
            f"{nfe} denoiser passes, {per_pass}"
        )
        for example, result in zip(examples, results, strict=True):
            text = tokenizer.decode(result.output_ids, skip_special_tokens=False)
            print(f"  {example.prompt!r} -> {text!r}")


if __name__ == "__main__":
    main()

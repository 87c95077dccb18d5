"""What a denoiser pass costs against an AR step, at the real Nemotron-H layer sizes.

    python benchmarks/pass_cost.py --device cuda     # real layer sizes (needs ~12 GB on a GPU)
    python benchmarks/pass_cost.py --smoke           # tiny sizes on the CPU (CI)

Whether block diffusion beats AR in wall-clock time depends on one ratio: the cost of a denoiser
pass over a 16-position block against the cost of one AR step (one token through the context
tower).  On the embedded 128-wide checkpoint the two are about equal, because both are bound by
per-operation overhead (``docs/performance.md``).  This measures the ratio with the project's
reference implementation at the real model's layer sizes (hidden 2688, Mamba-2 64×64 heads with
state 128, GQA 32/2 × 128, MoE 128 experts top-6 of width 1856 plus a 3712-wide shared expert,
vocabulary 131072) on a few layers of the real layer mix (``--pattern``; every layer of a type
costs the same, so the ratio does not depend on the depth), random bfloat16 weights, after a
context of ``--context`` tokens.  Timed (medians, device synchronised):

* AR step: the context tower reading 1 token (plus ``context_lm_head``);
* block step: the context tower reading a committed 16-token block;
* denoiser pass: the denoiser over 16 positions with joint attention and seeded Mamba.

From them it derives the block-diffusion / AR throughput ratio for full 16-token blocks at a few
passes per block: ``16 × AR step / (passes × pass + block step)``.  This is the reference, not the
vLLM engine (the GPU machine has no CUDA vLLM); it measures the model's arithmetic shape.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from docsections import machine_name

from vllm_twotower.config import TwoTowerConfig
from vllm_twotower.reference import TwoTowerModel
from vllm_twotower.tools.make_tiny import tiny_config

BLOCK = 16
PASSES = (2, 4, 6, 8, 16)


def real_layer_config(pattern: str) -> TwoTowerConfig:
    """Nemotron-3-Nano's layer sizes (``shared/spec/twotower-model.md``) on ``pattern``."""
    return TwoTowerConfig(
        vocab_size=131072,
        hidden_size=2688,
        pattern=pattern,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=128,
        mamba_num_heads=64,
        mamba_head_dim=64,
        ssm_state_size=128,
        n_groups=8,
        conv_kernel=4,
        chunk_size=128,
        n_routed_experts=128,
        num_experts_per_tok=6,
        moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712,
        routed_scaling_factor=2.5,
    )


def median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after two warm-up calls, synchronising ``device``."""

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    once(), once()
    return statistics.median(once() for _ in range(repeats))


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pattern", default="MEM*E", help="layers to build (real layer mix)")
    parser.add_argument("--context", type=int, default=512, help="tokens before the block")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few repeats (CI)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.smoke:
        config, args.context, args.repeats = tiny_config(pattern=args.pattern), 32, 3
    else:
        config = real_layer_config(args.pattern)
    with torch.device(device):
        model = TwoTowerModel(config).to(torch.bfloat16)
    model.eval()
    generator = torch.Generator(device=device).manual_seed(0)
    vocab = config.vocab_size

    def tokens(n: int) -> torch.Tensor:
        return torch.randint(4, vocab, (n,), generator=generator, device=device)

    _, context = model.extend_context(tokens(args.context), model.empty_context())
    block = tokens(BLOCK)
    canvas = torch.full((BLOCK,), config.diffusion.mask_token_id, device=device)
    ar_step = median_time(lambda: model.extend_context(block[:1], context), device, args.repeats)
    block_step = median_time(lambda: model.extend_context(block, context), device, args.repeats)
    denoise = median_time(lambda: model.denoise(canvas, context, t=0.5), device, args.repeats)

    sizes = "tiny (smoke)" if args.smoke else "real Nemotron-H layer sizes"
    print(
        f"{machine_name(device)}; {sizes}, layers {config.pattern!r}, bfloat16, context "
        f"{args.context} tokens, block {BLOCK}"
    )
    print("| AR step (1 token) ms | block step (16 tokens) ms | pass (16) ms | pass / AR step |")
    print("|---|---|---|---|")
    print(
        f"| {1e3 * ar_step:.2f} | {1e3 * block_step:.2f} | {1e3 * denoise:.2f} | "
        f"{denoise / ar_step:.2f} |"
    )
    print()
    print("| passes per full block | tokens per pass | diffusion / AR throughput |")
    print("|---|---|---|")
    for passes in PASSES:
        ratio = BLOCK * ar_step / (passes * denoise + block_step)
        print(f"| {passes} | {BLOCK / passes:.1f} | {ratio:.2f}× |")


if __name__ == "__main__":
    main()

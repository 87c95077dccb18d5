"""Write a tiny random TwoTower checkpoint in the real layout (for tests and smoke runs).

    python -m vllm_twotower.tools.make_tiny OUT_DIR [--seed 0] [--dtype float32] [--shard-bytes N]

The checkpoint has every layer type (Mamba-2, attention, MoE, dense MLP), head sizes that vLLM's
CPU attention accepts (head_dim 32), the project's tokenizer (ids 0..3 = pad, bos, eos, mask),
``config.json`` / ``generation_config.json`` as a real TwoTower checkpoint carries them, and the
tensors under the real names (``context_tower.*``, ``denoiser_tower.*``, heads, time
conditioning).  The weights are random but scaled so that logits are not flat.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import torch

from vllm_twotower.checkpoint import kept_dtype, save_checkpoint
from vllm_twotower.config import TwoTowerConfig
from vllm_twotower.data.tokenizer import save_tokenizer
from vllm_twotower.reference.model import TwoTowerModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_config(**overrides: object) -> TwoTowerConfig:
    """A few-hundred-thousand-parameter backbone using every Nemotron-H layer type."""
    config = TwoTowerConfig(
        vocab_size=128,
        hidden_size=64,
        pattern="M*EM-E*",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=2,
        conv_kernel=4,
        chunk_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=64,
        routed_scaling_factor=2.5,
        intermediate_size=96,
    )
    return replace(config, **overrides)


@torch.no_grad()
def init_random(model: TwoTowerModel, seed: int) -> None:
    """Deterministic random weights with Mamba-2's usual ``A``/``dt`` initialisation."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        shape = param.shape
        if name.endswith("A_log"):
            values = torch.log(1 + 15 * torch.rand(shape, generator=generator))
        elif name.endswith("dt_bias"):
            dt = torch.exp(
                torch.rand(shape, generator=generator) * (math.log(0.1) - math.log(1e-3))
                + math.log(1e-3)
            )
            values = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif name.endswith(("norm.weight", "norm_f.weight", ".D")):
            values = 1 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith("embeddings.weight"):
            values = torch.randn(shape, generator=generator)
        elif param.dim() == 1 or "scale_shift_tables" in name:
            values = 0.1 * torch.randn(shape, generator=generator)
        else:
            fan_in = shape[-1] if param.dim() == 2 else math.prod(shape[1:])
            values = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        param.copy_(values)
    for head in (model.lm_head, model.context_lm_head):
        head.weight.mul_(4.0)  # peakier logits, so commits and ties are exercised


def make_tiny_checkpoint(
    out: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
    config: TwoTowerConfig | None = None,
) -> TwoTowerConfig:
    """Create the checkpoint directory ``out``; return its config."""
    config = config or tiny_config()
    model = TwoTowerModel(config)
    init_random(model, seed)
    # Stored as NVIDIA stores a bf16 checkpoint: routers in float32, everything else in dtype.
    state = {name: t.to(kept_dtype(name, dtype)) for name, t in model.state_dict().items()}
    save_checkpoint(out, state, config, max_shard_bytes=max_shard_bytes)
    save_tokenizer(out)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--shard-bytes", type=int, default=None, help="write a sharded checkpoint")
    args = parser.parse_args()
    config = make_tiny_checkpoint(
        args.out, seed=args.seed, dtype=DTYPES[args.dtype], max_shard_bytes=args.shard_bytes
    )
    print(f"wrote a tiny TwoTower checkpoint ({config.pattern}) to {args.out}")


if __name__ == "__main__":
    main()

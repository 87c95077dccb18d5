"""MoE layer op: the compiled kernel ``torch.ops.twotower.moe_forward`` where it can run, else
the reference torch implementation (:func:`vllm_twotower.reference.moe.moe_forward`).

The kernel routes exactly as the reference (same ATen routing ops on CPU), groups the tokens by
expert once and runs one GEMM pair per expert; see ``docs/kernels.md``.
"""

from __future__ import annotations

import torch

from vllm_twotower.ops import extension_available, has_kernel

__all__ = ["moe_forward", "moe_kernel_supports"]

_DTYPES = (torch.float32, torch.bfloat16)


def moe_kernel_supports(hidden: torch.Tensor, up_weights: torch.Tensor) -> bool:
    """Whether the compiled MoE op can run these inputs (else the reference is used)."""
    return (
        hidden.dim() == 2
        and hidden.dtype in _DTYPES
        and up_weights.dtype == hidden.dtype
        and has_kernel("moe_forward", hidden.device)
    )


def moe_forward(
    hidden: torch.Tensor,
    *,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor,
    up_weights: torch.Tensor,
    down_weights: torch.Tensor,
    shared_up: torch.Tensor | None,
    shared_down: torch.Tensor | None,
    top_k: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
    router_dtype: torch.dtype = torch.float64,
    use_kernel: bool = True,
) -> torch.Tensor:
    """The MoE layer on ``[N, H]`` tokens; arguments as the reference's ``moe_forward``.

    ``use_kernel=False`` or ``TWOTOWER_DISABLE_KERNELS=1`` forces the reference implementation.
    """
    args = {
        "gate_weight": gate_weight,
        "correction_bias": correction_bias,
        "up_weights": up_weights,
        "down_weights": down_weights,
        "shared_up": shared_up,
        "shared_down": shared_down,
        "top_k": top_k,
        "routed_scaling_factor": routed_scaling_factor,
        "norm_topk_prob": norm_topk_prob,
        "router_dtype": router_dtype,
    }
    if use_kernel and moe_kernel_supports(hidden, up_weights):
        return torch.ops.twotower.moe_forward(hidden, *args.values())
    # Imported here: the reference package's model blocks import this module.
    from vllm_twotower.reference.moe import moe_forward as reference_moe_forward

    return reference_moe_forward(hidden, **args)


def _register_fake() -> None:
    """Shape-only implementation so ``torch.compile`` / fake tensors can trace through the op."""

    @torch.library.register_fake("twotower::moe_forward")
    def _fake(
        hidden: torch.Tensor,
        gate_weight: torch.Tensor,
        correction_bias: torch.Tensor,
        up_weights: torch.Tensor,
        down_weights: torch.Tensor,
        shared_up: torch.Tensor | None,
        shared_down: torch.Tensor | None,
        top_k: int,
        routed_scaling_factor: float,
        norm_topk_prob: bool,
        router_dtype: torch.dtype,
    ) -> torch.Tensor:
        return torch.empty_like(hidden)


if extension_available():
    _register_fake()

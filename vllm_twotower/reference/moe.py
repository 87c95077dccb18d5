"""Nemotron-H mixture of experts: sigmoid router with correction bias, non-gated relu² experts.

Readable reference semantics (``shared/spec/twotower-model.md`` §1):

* ``logits = x · Wᵀ`` (float64 by default, as NVIDIA does to reproduce Megatron's tie-breaking);
* ``scores = sigmoid(logits)``; experts = top-k of ``scores + e_score_correction_bias``;
* weights = the chosen *raw* scores, divided by their sum when ``norm_topk_prob``, times
  ``routed_scaling_factor``;
* ``out = Σ_k w_k · down_k(relu(up_k(x))²) + shared(x)``.

The compiled kernel (``vllm_twotower.ops.moe``) is tested against :func:`moe_forward`.
"""

from __future__ import annotations

import torch

from vllm_twotower.reference.dtypes import at_least_float32


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU, the activation of every Nemotron-H MLP and expert."""
    return torch.relu(x).square()


def route(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor,
    *,
    top_k: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
    router_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``top_k`` experts per token.

    Args:
        hidden: ``[N, H]`` token activations.
        gate_weight: ``[E, H]`` router weight.
        correction_bias: ``[E]`` ``e_score_correction_bias`` (affects the choice only).

    Returns:
        ``(weights [N, top_k] in at least float32, expert ids [N, top_k] int64)``; ties in the
        biased score go to the lower expert id (``torch.topk`` on CPU, sorted descending).
    """
    logits = hidden.to(router_dtype) @ gate_weight.to(router_dtype).t()
    scores = torch.sigmoid(logits)
    choice_scores = scores + correction_bias.to(router_dtype)
    expert_ids = torch.topk(choice_scores, top_k, dim=-1, sorted=True).indices
    weights = scores.gather(-1, expert_ids)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights * routed_scaling_factor).to(at_least_float32(hidden.dtype)), expert_ids


def expert_mlp(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down(relu(up(x))²)`` with ``up: [I, H]`` and ``down: [H, I]`` (nn.Linear layout)."""
    return relu2(x @ up.t()) @ down.t()


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
) -> torch.Tensor:
    """The whole MoE layer on ``[N, H]`` tokens.

    ``up_weights: [E, I, H]`` and ``down_weights: [E, H, I]`` stack the routed experts;
    ``shared_up: [Is, H]``, ``shared_down: [H, Is]`` are the shared expert (or ``None``).
    Tokens are grouped by expert so each expert runs one matrix product on its tokens.
    """
    weights, expert_ids = route(
        hidden,
        gate_weight,
        correction_bias,
        top_k=top_k,
        routed_scaling_factor=routed_scaling_factor,
        norm_topk_prob=norm_topk_prob,
        router_dtype=router_dtype,
    )
    out = torch.zeros_like(hidden, dtype=at_least_float32(hidden.dtype))
    flat_experts = expert_ids.flatten()
    flat_tokens = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(top_k)
    flat_weights = weights.flatten()
    for expert in torch.unique(flat_experts).tolist():
        sel = flat_experts == expert
        tokens = flat_tokens[sel]
        y = expert_mlp(hidden[tokens], up_weights[expert], down_weights[expert])
        out.index_add_(0, tokens, y.to(out.dtype) * flat_weights[sel].unsqueeze(-1))
    if shared_up is not None and shared_down is not None:
        out += expert_mlp(hidden, shared_up, shared_down).to(out.dtype)
    return out.to(hidden.dtype)

"""MoE: the grouped-by-expert layer equals a per-token loop over the spec's formula."""

from __future__ import annotations

import torch

from vllm_twotower.reference.moe import expert_mlp, moe_forward, route


def _weights(seed: int, tokens: int = 13, hidden: int = 16, experts: int = 8, width: int = 12):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(tokens, hidden, generator=g),
        "gate_weight": torch.randn(experts, hidden, generator=g),
        "correction_bias": 0.5 * torch.randn(experts, generator=g),
        "up_weights": torch.randn(experts, width, hidden, generator=g) / 4,
        "down_weights": torch.randn(experts, hidden, width, generator=g) / 4,
        "shared_up": torch.randn(20, hidden, generator=g) / 4,
        "shared_down": torch.randn(hidden, 20, generator=g) / 4,
    }


def _per_token(w: dict, top_k: int, scaling: float, normalize: bool) -> torch.Tensor:
    out = torch.zeros_like(w["hidden"])
    for i, x in enumerate(w["hidden"]):
        logits = x.double() @ w["gate_weight"].double().t()
        scores = torch.sigmoid(logits)
        chosen = sorted(
            range(len(scores)),
            key=lambda e: (-(scores[e] + w["correction_bias"][e].double()).item(), e),
        )[:top_k]
        weights = torch.stack([scores[e] for e in chosen])
        if normalize:
            weights = weights / weights.sum()
        for e, wt in zip(chosen, weights * scaling, strict=True):
            out[i] += float(wt) * expert_mlp(x, w["up_weights"][e], w["down_weights"][e])
        out[i] += expert_mlp(x, w["shared_up"], w["shared_down"])
    return out


def test_moe_layer_matches_per_token_loop() -> None:
    w = _weights(0)
    for normalize in (True, False):
        got = moe_forward(
            **{k: w[k] for k in w}, top_k=3, routed_scaling_factor=2.5, norm_topk_prob=normalize
        )
        torch.testing.assert_close(got, _per_token(w, 3, 2.5, normalize), rtol=1e-5, atol=1e-5)


def test_router_bias_changes_choice_not_weights() -> None:
    w = _weights(1)
    kwargs = {"top_k": 2, "routed_scaling_factor": 1.0, "norm_topk_prob": False}
    weights, ids = route(w["hidden"], w["gate_weight"], torch.zeros(8), **kwargs)
    bias = torch.zeros(8)
    bias[7] = 10.0  # forces expert 7 into every token's choice
    biased_weights, biased_ids = route(w["hidden"], w["gate_weight"], bias, **kwargs)
    assert (biased_ids == 7).any(dim=-1).all()
    scores = torch.sigmoid(w["hidden"].double() @ w["gate_weight"].double().t())
    torch.testing.assert_close(
        biased_weights.double(), scores.gather(-1, biased_ids).to(torch.float32).double()
    )
    torch.testing.assert_close(weights.double(), scores.gather(-1, ids).float().double())


def test_normalized_weights_sum_to_scaling_factor() -> None:
    w = _weights(2)
    weights, _ = route(
        w["hidden"],
        w["gate_weight"],
        w["correction_bias"],
        top_k=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    torch.testing.assert_close(weights.sum(-1), torch.full((13,), 2.5))


def test_moe_without_shared_expert() -> None:
    w = _weights(3)
    w_no_shared = {**w, "shared_up": None, "shared_down": None}
    with_shared = moe_forward(**w, top_k=2, routed_scaling_factor=1.0, norm_topk_prob=True)
    without = moe_forward(**w_no_shared, top_k=2, routed_scaling_factor=1.0, norm_topk_prob=True)
    torch.testing.assert_close(
        with_shared - without,
        expert_mlp(w["hidden"], w["shared_up"], w["shared_down"]),
        rtol=1e-5,
        atol=1e-5,
    )

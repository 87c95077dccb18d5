"""The compiled MoE op against the reference MoE layer (vllm_twotower.reference.moe)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_twotower.ops import DISABLE_ENV, extension_available, extension_status, has_kernel
from vllm_twotower.ops import moe as moe_ops
from vllm_twotower.reference import moe as reference

needs_kernel = pytest.mark.skipif(
    not extension_available(), reason=f"compiled ops unavailable: {extension_status()}"
)


def make_layer(
    *,
    seed: int,
    tokens: int,
    hidden: int,
    experts: int,
    width: int,
    shared_width: int | None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, dict]:
    """Tokens and MoE weights scaled so that outputs are O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) / fan_in**0.5).to(dtype)

    weights = {
        "gate_weight": rand(experts, hidden, fan_in=hidden).float(),
        "correction_bias": torch.randn(experts, generator=gen) * 0.1,
        "up_weights": rand(experts, width, hidden, fan_in=hidden),
        "down_weights": rand(experts, hidden, width, fan_in=width),
        "shared_up": rand(shared_width, hidden, fan_in=hidden) if shared_width else None,
        "shared_down": rand(hidden, shared_width, fan_in=shared_width) if shared_width else None,
    }
    return torch.randn(tokens, hidden, generator=gen).to(dtype), weights


@needs_kernel
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    tokens=st.integers(0, 40),
    hidden=st.integers(1, 48),
    experts=st.integers(1, 16),
    width=st.integers(1, 24),
    shared_width=st.one_of(st.none(), st.integers(1, 32)),
    norm_topk_prob=st.booleans(),
    router_dtype=st.sampled_from([torch.float64, torch.float32]),
    scaling=st.sampled_from([1.0, 2.5]),
    tied_router=st.booleans(),
    data=st.data(),
)
def test_kernel_matches_reference(
    seed: int,
    tokens: int,
    hidden: int,
    experts: int,
    width: int,
    shared_width: int | None,
    norm_topk_prob: bool,
    router_dtype: torch.dtype,
    scaling: float,
    tied_router: bool,
    data: st.DataObject,
) -> None:
    top_k = data.draw(st.integers(1, min(experts, 6)), label="top_k")
    x, weights = make_layer(
        seed=seed,
        tokens=tokens,
        hidden=hidden,
        experts=experts,
        width=width,
        shared_width=shared_width,
    )
    if tied_router:  # equal scores for every expert: the choice is decided by tie-breaking alone
        weights["gate_weight"] = weights["gate_weight"][:1].expand(experts, hidden).contiguous()
        weights["correction_bias"] = torch.zeros(experts)
    kwargs = {
        **weights,
        "top_k": top_k,
        "routed_scaling_factor": scaling,
        "norm_topk_prob": norm_topk_prob,
        "router_dtype": router_dtype,
    }
    out = moe_ops.moe_forward(x, **kwargs)
    expected = reference.moe_forward(x, **kwargs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_bfloat16_matches_reference() -> None:
    x, weights = make_layer(
        seed=5, tokens=24, hidden=64, experts=8, width=32, shared_width=48, dtype=torch.bfloat16
    )
    kwargs = {**weights, "top_k": 3, "routed_scaling_factor": 2.5, "norm_topk_prob": True}
    out = moe_ops.moe_forward(x, **kwargs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference.moe_forward(x, **kwargs), atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel("moe_forward", torch.device("cuda"))),
    reason="no CUDA device or no CUDA build of the MoE kernel",
)
@pytest.mark.parametrize("router_dtype", [torch.float64, torch.float32])
def test_cuda_kernel_matches_reference(router_dtype: torch.dtype) -> None:
    x, weights = make_layer(seed=3, tokens=50, hidden=64, experts=16, width=32, shared_width=48)
    kwargs = {
        **weights,
        "top_k": 6,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "router_dtype": router_dtype,
    }
    on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out = moe_ops.moe_forward(x.cuda(), **on_gpu).cpu()
    # cuBLAS may use TF32 or another summation order: compare loosely.
    torch.testing.assert_close(out, reference.moe_forward(x, **kwargs), atol=1e-3, rtol=1e-3)


@needs_kernel
def test_parallel_path_under_inference_mode() -> None:
    """Big enough for the multi-threaded expert schedule, run as vLLM runs models."""
    x, weights = make_layer(seed=9, tokens=64, hidden=256, experts=8, width=64, shared_width=128)
    kwargs = {**weights, "top_k": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True}
    with torch.inference_mode():
        out = moe_ops.moe_forward(x, **kwargs)
        expected = reference.moe_forward(x, **kwargs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_forced_fallback_uses_reference(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x, weights = make_layer(seed=1, tokens=6, hidden=8, experts=4, width=5, shared_width=None)
    kwargs = {**weights, "top_k": 2, "routed_scaling_factor": 1.0, "norm_topk_prob": True}
    monkeypatch.setattr(moe_ops.torch.ops, "twotower", None)  # any kernel call would fail
    if how == "environment":
        monkeypatch.setenv(DISABLE_ENV, "1")
    else:
        kwargs["use_kernel"] = False
    out = moe_ops.moe_forward(x, **kwargs)
    kwargs.pop("use_kernel", None)
    torch.testing.assert_close(out, reference.moe_forward(x, **kwargs), atol=0, rtol=0)


@needs_kernel
def test_fake_impl_traces() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, weights = make_layer(seed=0, tokens=3, hidden=8, experts=4, width=5, shared_width=6)
        out = moe_ops.moe_forward(
            x, **weights, top_k=2, routed_scaling_factor=2.5, norm_topk_prob=True
        )
    assert out.shape == (3, 8) and out.dtype == torch.float32

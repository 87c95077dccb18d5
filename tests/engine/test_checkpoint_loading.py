"""vLLM's real loader on tiny real-layout checkpoints: strict loading and a float32 router.

Each test writes a checkpoint to disk and loads it with ``vllm.model_executor.model_loader.
get_model`` (safetensors reader, ``AutoWeightsLoader``, TP weight loaders, post-processing), as
a worker does, without starting an engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch
from vllm.config import set_current_vllm_config

from vllm_twotower.checkpoint import CheckpointError, load_state_dict, save_checkpoint
from vllm_twotower.reference import TwoTowerModel
from vllm_twotower.reference.moe import moe_forward, route
from vllm_twotower.tools.check_checkpoint import engine_config, free_port, model_parallel
from vllm_twotower.tools.make_tiny import make_tiny_checkpoint, tiny_config

MOE_LAYER = 2  # tiny_config's pattern "M*EM-E*": layer 2 is an MoE layer


@contextlib.contextmanager
def vllm_model(path: Path, dtype: str = "float32") -> Iterator[torch.nn.Module]:
    """The model as a vLLM worker loads it (CPU, TP 1), inside vLLM's distributed state."""
    from vllm.model_executor.model_loader import get_model

    config = engine_config(path, 1, dtype=dtype)
    init = f"tcp://127.0.0.1:{free_port()}"
    # vLLM's CPU model runner makes these no-ops before it loads a model; so does this.
    with (
        mock.patch.object(torch.accelerator, "empty_cache", lambda: None),
        mock.patch.object(torch.accelerator, "synchronize", lambda *a: None),
        set_current_vllm_config(config),
        model_parallel(1, 0, init),
    ):
        yield get_model(vllm_config=config)


def load_with_vllm(path: Path) -> torch.nn.Module:
    with vllm_model(path) as model:
        return model


def rewrite(src: Path, dst: Path, edit: dict[str, torch.Tensor | None]) -> Path:
    """A copy of checkpoint ``src`` with tensors replaced, added or (``None``) removed."""
    state = load_state_dict(src)
    for name, tensor in edit.items():
        if tensor is None:
            del state[name]
        else:
            state[name] = tensor
    save_checkpoint(dst, state, tiny_config())
    return dst


def test_a_missing_expert_is_refused_by_name(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """One expert of one layer missing: vLLM alone loads this silently (its post-load check
    exempts linear and MoE modules, and a stacked expert parameter counts as loaded after any
    one expert), serving that expert from uninitialised memory."""
    gone = f"denoiser_tower.layers.{MOE_LAYER}.mixer.experts.5.down_proj.weight"
    path = rewrite(tiny_checkpoint, tmp_path / "partial", {gone: None})
    with pytest.raises(CheckpointError) as err:
        load_with_vllm(path)
    message = str(err.value)
    assert "1 missing tensors" in message and gone in message
    assert "unexpected" not in message


def test_an_unexpected_tensor_is_refused_by_name(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Extra tensors: a stray ``*.bias`` (vLLM's AutoWeightsLoader ignores unexpected biases),
    an expert id the layer has no slot for (vLLM's fused-MoE loader drops it) and a tensor of
    the wrong shape, all named in one error; ``mtp.*`` is skipped on purpose."""
    hidden = tiny_config().hidden_size
    extra_bias = "context_tower.layers.0.mixer.out_proj.bias"
    extra_expert = f"context_tower.layers.{MOE_LAYER}.mixer.experts.8.up_proj.weight"
    misshaped = "context_tower.norm_f.weight"
    edit = {
        extra_bias: torch.zeros(hidden),
        extra_expert: torch.zeros(32, hidden),
        misshaped: torch.ones(hidden + 1),
        "mtp.layers.0.norm.weight": torch.ones(hidden),
    }
    path = rewrite(tiny_checkpoint, tmp_path / "extra", edit)
    with pytest.raises(CheckpointError) as err:
        load_with_vllm(path)
    message = str(err.value)
    assert "2 unexpected tensors" in message
    assert extra_bias in message and extra_expert in message
    assert f"{misshaped} ({hidden + 1},) (expected ({hidden},))" in message
    assert "mtp.layers" not in message


def test_a_complete_checkpoint_loads(tiny_checkpoint: Path) -> None:
    model = load_with_vllm(tiny_checkpoint)
    state = load_state_dict(tiny_checkpoint)
    mixer = model.denoiser.layers[MOE_LAYER].mixer
    torch.testing.assert_close(
        mixer.down_weights[7],
        state[f"denoiser_tower.layers.{MOE_LAYER}.mixer.experts.7.down_proj.weight"],
    )


def near_tie_router(hidden: int, experts: int) -> torch.Tensor:
    """Router weights (float32) whose scores for a unit token tie once rounded to bf16.

    Token ``x = e_0``: logits ``[3, 1, 1 + 2⁻¹², -3, ...]``.  In float32/float64 the top 2 are
    experts 0 and 2; rounded to bf16 (8 mantissa bits) expert 2's logit becomes exactly 1, ties
    with expert 1, and the lower id wins: experts 0 and 1.
    """
    weight = torch.zeros(experts, hidden)
    weight[:, 0] = -3.0
    weight[0, 0], weight[1, 0], weight[2, 0] = 3.0, 1.0, 1.0 + 2.0**-12
    return weight


def test_router_stays_float32_with_a_bf16_checkpoint(tmp_path: Path) -> None:
    """A bf16 checkpoint whose router (stored in float32, as NVIDIA keeps it) has a near tie:
    vLLM's CPU MoE and the reference choose the experts float32/float64 routing chooses, not
    the ones a bf16-rounded router would."""
    config = tiny_config()
    base = tmp_path / "bf16"
    make_tiny_checkpoint(base, seed=0, dtype=torch.bfloat16)
    prefix = f"context_tower.layers.{MOE_LAYER}.mixer"
    router = near_tie_router(config.hidden_size, config.n_routed_experts)
    bias = torch.zeros(config.n_routed_experts)
    path = rewrite(
        base,
        tmp_path / "tie",
        {f"{prefix}.gate.weight": router, f"{prefix}.gate.e_score_correction_bias": bias},
    )
    state = load_state_dict(path)
    assert state[f"{prefix}.gate.weight"].dtype == torch.float32
    assert state[f"{prefix}.experts.0.up_proj.weight"].dtype == torch.bfloat16

    tokens = torch.zeros(2, config.hidden_size, dtype=torch.bfloat16)
    tokens[0, 0] = 1.0  # the near tie
    tokens[1] = torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(0))
    routing = {"top_k": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True}
    _, chosen = route(tokens, router, bias, **routing)
    _, rounded = route(tokens, router.bfloat16(), bias, **routing)
    assert chosen[0].tolist() == [0, 2] and rounded[0].tolist() == [0, 1]  # the test can see it

    experts = {
        "up_weights": torch.stack(
            [state[f"{prefix}.experts.{e}.up_proj.weight"] for e in range(config.n_routed_experts)]
        ),
        "down_weights": torch.stack(
            [
                state[f"{prefix}.experts.{e}.down_proj.weight"]
                for e in range(config.n_routed_experts)
            ]
        ),
        "shared_up": state[f"{prefix}.shared_experts.up_proj.weight"],
        "shared_down": state[f"{prefix}.shared_experts.down_proj.weight"],
        "correction_bias": bias,
        **routing,
    }
    expected = moe_forward(tokens, gate_weight=router, **experts).float()
    wrong = moe_forward(tokens, gate_weight=router.bfloat16(), **experts).float()

    with vllm_model(path, dtype="bfloat16") as model:
        mixer = model.model.layers[MOE_LAYER].mixer
        served = mixer(tokens).float()
        router_dtype = mixer.gate.weight.dtype
    # bf16 arithmetic differs between the kernel and the reference by far less than the
    # output of a different expert choice does.
    gap = (expected[0] - wrong[0]).abs().max().item()
    for row in range(len(tokens)):
        assert (served[row] - expected[row]).abs().max().item() < gap / 4
    assert router_dtype == torch.float32
    reference = TwoTowerModel.from_pretrained(path, dtype=torch.bfloat16)
    ref_mixer = reference.context_tower.layers[MOE_LAYER].mixer
    assert ref_mixer.gate.weight.dtype == torch.float32
    assert (ref_mixer(tokens).float() - expected).abs().max().item() < gap / 4

"""Nemotron-H MoE layer for platforms where vLLM's fused MoE lacks non-gated relu² experts.

vLLM's ``NemotronHMoE`` builds a ``FusedMoE``; on CPU that raises ``is_act_and_mul=False is
supported only for CUDA, XPU and ROCm``.  :class:`TwoTowerMoE` keeps the checkpoint's layout
(``gate``, ``experts.{e}.up_proj/down_proj``, ``shared_experts``) and calls the project's op
:func:`vllm_twotower.ops.moe.moe_forward` through a registered custom op, so ``torch.compile``
treats it as opaque.  Tensor parallelism shards every expert's intermediate dimension (up by
rows, down by columns), so each rank computes a partial sum that one all-reduce completes;
routing is replicated, which keeps the expert choice identical on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import NemotronHConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.nemotron_h import NemotronHMLP, NemotronHMoEDecoderLayer
from vllm.platforms import current_platform
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_twotower.checkpoint import ROUTER_DTYPE
from vllm_twotower.ops.moe import moe_forward


def _twotower_moe(
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
) -> torch.Tensor:
    return moe_forward(
        hidden,
        gate_weight=gate_weight,
        correction_bias=correction_bias,
        up_weights=up_weights,
        down_weights=down_weights,
        shared_up=shared_up,
        shared_down=shared_down,
        top_k=top_k,
        routed_scaling_factor=routed_scaling_factor,
        norm_topk_prob=norm_topk_prob,
    )


def _twotower_moe_fake(hidden: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty_like(hidden)


direct_register_custom_op("twotower_moe", _twotower_moe, fake_impl=_twotower_moe_fake)


#: Checkpoint projection name -> (stacked parameter, axis of one expert's matrix TP shards).
_EXPERT_PARAMS = {"up_proj": ("up_weights", 0), "down_proj": ("down_weights", 1)}


def _expert_rows(param: torch.Tensor, loaded: torch.Tensor, expert: int, axis: int) -> None:
    """Copy this rank's shard (along ``axis`` of one expert's matrix) into ``param[expert]``."""
    shard = param.shape[1 + axis]
    start = get_tensor_model_parallel_rank() * shard
    param.data[expert].copy_(loaded.narrow(axis, start, shard))


class TwoTowerMoE(nn.Module):
    """The MoE mixer (router with correction bias, relu² experts, shared expert)."""

    def __init__(self, config: NemotronHConfig, prefix: str = "") -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        hidden, inter = config.hidden_size, config.moe_intermediate_size
        if inter % tp:
            raise ValueError(f"moe_intermediate_size {inter} is not divisible by TP size {tp}")
        num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.routed_scaling_factor = float(config.routed_scaling_factor)
        self.norm_topk_prob = bool(config.norm_topk_prob)
        # The router stays float32 whatever the model dtype, as NVIDIA's code and vLLM's own
        # NemotronH MoE keep it: rounding it to bf16 changes the expert choice on close scores.
        self.gate = nn.Module()
        self.gate.weight = nn.Parameter(
            torch.empty(num_experts, hidden, dtype=ROUTER_DTYPE), requires_grad=False
        )
        self.gate.e_score_correction_bias = nn.Parameter(
            torch.empty(num_experts, dtype=ROUTER_DTYPE), requires_grad=False
        )
        self.up_weights = nn.Parameter(
            torch.empty(num_experts, inter // tp, hidden), requires_grad=False
        )
        self.down_weights = nn.Parameter(
            torch.empty(num_experts, hidden, inter // tp), requires_grad=False
        )
        self._experts_filled: dict[str, set[int]] = {}  # stacked parameter -> experts written
        shared = (config.moe_shared_expert_intermediate_size or 0) * (config.n_shared_experts or 0)
        self.shared_experts = (
            NemotronHMLP(
                config,
                hidden_size=hidden,
                intermediate_size=shared,
                reduce_results=False,
                prefix=f"{prefix}.shared_experts",
            )
            if shared
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = torch.ops.vllm.twotower_moe(
            hidden_states,
            self.gate.weight,
            self.gate.e_score_correction_bias,
            self.up_weights,
            self.down_weights,
            None,
            None,
            self.top_k,
            self.routed_scaling_factor,
            self.norm_topk_prob,
        )
        # The shared expert runs as vLLM's own MLP module: on CPU, vLLM repacks linear
        # weights after loading, so their raw `.weight` cannot be handed to the op.
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        if get_tensor_model_parallel_world_size() > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load checkpoint names relative to the mixer; return the names of params loaded.

        A stacked expert parameter counts as loaded only once every expert has been written
        into it (across calls: vLLM may hand a layer's tensors over in several runs).
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith("experts."):
                _, expert, proj, _ = name.split(".")
                target, axis = _EXPERT_PARAMS[proj]
                _expert_rows(getattr(self, target), tensor, int(expert), axis=axis)
                filled = self._experts_filled.setdefault(target, set())
                filled.add(int(expert))
                if len(filled) == self.up_weights.shape[0]:
                    loaded.add(target)
                continue
            param = params[name]
            loader = getattr(param, "weight_loader", None)
            if loader is not None:
                loader(param, tensor)
            else:
                param.data.copy_(tensor)
            loaded.add(name)
        return loaded


class TwoTowerMoEDecoderLayer(NemotronHMoEDecoderLayer):
    """vLLM's MoE decoder layer with :class:`TwoTowerMoE` as its mixer."""

    def __init__(self, config: NemotronHConfig, layer_idx: int, *, prefix: str = "", **kwargs):
        nn.Module.__init__(self)
        self.config = config
        self.mixer = TwoTowerMoE(config, prefix=f"{prefix}.mixer")
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)


def needs_project_moe() -> bool:
    """Whether vLLM's fused MoE cannot run non-gated relu² experts on this platform."""
    return not (
        current_platform.is_cuda() or current_platform.is_rocm() or current_platform.is_xpu()
    )

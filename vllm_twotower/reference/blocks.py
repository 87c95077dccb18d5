"""Nemotron-H residual blocks and the backbone that both towers are copies of.

A block is ``x + mixer(norm(x))`` where the mixer is Mamba-2 (``M``), attention (``*``), MoE
(``E``) or a dense relu² MLP (``-``).  The denoiser adds adaLN-single time modulation
(``shared/spec/twotower-model.md`` §3): for ``M``/``*`` blocks the input is modulated *before*
the norm, for feed-forward blocks (``E``, and by our inference ``-``) the norm's output is
modulated; the mixer output is scaled by the gate in both cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vllm_twotower.config import ATTENTION, MAMBA, MLP, MOE, TwoTowerConfig
from vllm_twotower.ops.moe import moe_forward
from vllm_twotower.reference.attention import Attention
from vllm_twotower.reference.dtypes import at_least_float32
from vllm_twotower.reference.mamba2 import Mamba2Mixer
from vllm_twotower.reference.moe import relu2

LayerCache = tuple[torch.Tensor, ...]  # attention: (k, v); Mamba: (conv, ssm); others: ()


@dataclass(frozen=True)
class ContextState:
    """What the context tower has read: per-layer caches after ``length`` tokens.

    Immutable, so mock-AR can keep the state *before* the last token while extending a copy.
    """

    length: int
    caches: tuple[LayerCache, ...]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(at_least_float32(x.dtype))
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class FeedForward(nn.Module):
    """Dense or expert feed-forward ``down(relu(up(x))²)`` (no gate, no bias)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x)))


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts))


class MoE(nn.Module):
    """Checkpoint-shaped MoE mixer (``gate``, ``experts.{e}``, ``shared_experts``)."""

    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        size = config.hidden_size
        self.gate = Router(size, config.n_routed_experts)
        self.experts = nn.ModuleList(
            FeedForward(size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        shared = config.moe_shared_expert_intermediate_size * config.n_shared_experts
        self.shared_experts = FeedForward(size, shared) if shared > 0 else None
        self.top_k = config.num_experts_per_tok
        self.routed_scaling_factor = config.routed_scaling_factor
        self.norm_topk_prob = config.norm_topk_prob

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """MoE on ``[..., H]`` tokens; the compiled kernel only where no gradient is recorded."""
        shared = self.shared_experts
        records_grad = torch.is_grad_enabled() and (
            hidden.requires_grad or self.gate.weight.requires_grad
        )
        out = moe_forward(
            hidden.reshape(-1, hidden.shape[-1]),
            gate_weight=self.gate.weight,
            correction_bias=self.gate.e_score_correction_bias,
            up_weights=torch.stack([e.up_proj.weight for e in self.experts]),
            down_weights=torch.stack([e.down_proj.weight for e in self.experts]),
            shared_up=shared.up_proj.weight if shared is not None else None,
            shared_down=shared.down_proj.weight if shared is not None else None,
            top_k=self.top_k,
            routed_scaling_factor=self.routed_scaling_factor,
            norm_topk_prob=self.norm_topk_prob,
            use_kernel=not records_grad,  # the kernel has no backward
        )
        return out.reshape(hidden.shape)


class Block(nn.Module):
    """One residual layer: ``norm`` then ``mixer`` (checkpoint names ``layers.{i}.norm/mixer``)."""

    def __init__(self, config: TwoTowerConfig, symbol: str) -> None:
        super().__init__()
        self.symbol = symbol
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer: nn.Module
        if symbol == MAMBA:
            self.mixer = Mamba2Mixer(
                config.hidden_size,
                config.mamba_num_heads,
                config.mamba_head_dim,
                config.ssm_state_size,
                config.n_groups,
                config.conv_kernel,
                config.chunk_size,
                config.layer_norm_epsilon,
                use_conv_bias=config.use_conv_bias,
                time_step_limit=config.time_step_limit,
            )
        elif symbol == ATTENTION:
            self.mixer = Attention(
                config.hidden_size,
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim,
            )
        elif symbol == MOE:
            self.mixer = MoE(config)
        elif symbol == MLP:
            self.mixer = FeedForward(config.hidden_size, config.intermediate_size)
        else:
            raise ValueError(f"unknown layer symbol {symbol!r}")

    def empty_cache(self, device: torch.device | None = None) -> LayerCache:
        if self.symbol == MAMBA:
            return self.mixer.initial_state(device)
        if self.symbol == ATTENTION:
            return self.mixer.empty_cache(device)
        return ()

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerCache,
        *,
        causal: bool,
        modulation: torch.Tensor | None,
    ) -> tuple[torch.Tensor, LayerCache]:
        """Return ``(x + [gate ·] mixer(h), cache after these tokens)``.

        ``modulation`` is this layer's ``(shift, scale, gate)`` as a ``[3, H]`` tensor, or
        ``None`` for an unconditioned block (the context tower, and mock-AR's denoiser pass).
        """
        sequence_mixer = self.symbol in (MAMBA, ATTENTION)
        if modulation is None:
            h = self.norm(x)
        else:
            shift, scale, _ = modulation
            if sequence_mixer:
                h = self.norm(x * (1 + scale) + shift)
            else:
                h = self.norm(x) * (1 + scale) + shift
        if self.symbol == MAMBA:
            out, *new_cache = self.mixer(h, *cache)
        elif self.symbol == ATTENTION:
            out, *new_cache = self.mixer(h, *cache, causal=causal)
        else:
            out, new_cache = self.mixer(h), []
        if modulation is not None:
            out = modulation[2] * out
        return x + out, tuple(new_cache)


class Backbone(nn.Module):
    """One tower: ``embeddings``, ``layers``, ``norm_f`` (a full Nemotron-H backbone)."""

    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, symbol) for symbol in config.pattern)
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def empty_state(self, device: torch.device | None = None) -> ContextState:
        return ContextState(0, tuple(layer.empty_cache(device) for layer in self.layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        state: ContextState,
        *,
        causal: bool,
        modulation: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ContextState]:
        """Run ``input_ids [T]`` after ``state``; return final-normed hidden ``[T, H]``, state.

        ``modulation``: ``[L, 3, H]`` per-layer adaLN parameters, or ``None``.
        """
        x = self.embeddings(input_ids)
        if input_ids.shape[-1] == 0:  # a one-token prompt's mock-AR context: nothing to read
            return self.norm_f(x), state
        caches = []
        for i, layer in enumerate(self.layers):
            mod = modulation[i] if modulation is not None else None
            x, cache = layer(x, state.caches[i], causal=causal, modulation=mod)
            caches.append(cache)
        return self.norm_f(x), ContextState(state.length + input_ids.shape[-1], tuple(caches))

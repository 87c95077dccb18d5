"""Nemotron-H layers run over a block of tokens on top of a read-only context.

Both uses of a TwoTower tower outside vLLM's own forward go through :func:`run_layers`:

* the denoiser pass: a block attends, without a mask, to the context keys/values of the same
  layer plus the whole block, and its Mamba scans start from the context's states;
* mock-AR's catch-up of the context tower over a few tokens (causal attention, states kept).

The layers are vLLM's Nemotron-H decoder layers; only their projections, norms and parameters
are used, never their ``forward`` (which would read and write vLLM's caches).  The
sequence math (causal conv, SSD scan) is the reference implementation's, so the engine and the
oracle agree on the same inputs; joint attention reads the context where vLLM's cache keeps it
(:mod:`vllm_twotower.ops.paged_attention`, whose fallback is the reference ``attend`` over a
gathered copy).  Every row of the batch goes through each of them in one call, so a pass costs
the same number of operations at any batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.models.nemotron_h import (
    NemotronHAttentionDecoderLayer,
    NemotronHMambaDecoderLayer,
)

from vllm_twotower import vllm_internals as vi
from vllm_twotower.ops.paged_attention import PagedKV, paged_block_attention
from vllm_twotower.reference.mamba2 import causal_conv1d, ssd_chunk_scan

MambaStates = dict[int, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MambaSlots:
    """One Mamba layer's states of a batch of rows, in place in vLLM's state cache.

    ``conv_cache`` / ``ssm_cache``: the layer's state tensors (never copied whole); ``slots
    [R]``: each row's state slot; ``dim_first``: whether the conv state is stored
    ``[conv_dim, K-1]`` (else ``[K-1, conv_dim]``).  A pass reads a layer's rows when it reaches
    that layer (:meth:`read`), so no per-row copy of every layer's states is held across a
    block's passes.
    """

    conv_cache: torch.Tensor
    ssm_cache: torch.Tensor
    slots: torch.Tensor
    dim_first: bool

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv ``[R, conv_dim, K-1]`` (oldest input first) and SSM states of the rows."""
        conv = self.conv_cache[self.slots]
        return (conv if self.dim_first else conv.transpose(-1, -2)), self.ssm_cache[self.slots]

    def select(self, rows: torch.Tensor) -> MambaSlots:
        """The same layer for a subset of the rows."""
        return replace(self, slots=self.slots[rows.to(self.slots.device)])


@dataclass
class BlockContext:
    """What a block pass reads of the context tower, for a batch of ``B`` rows.

    ``kv[l]``: attention layer ``l``'s context keys/values where vLLM keeps them
    (:class:`~vllm_twotower.ops.paged_attention.PagedKV`); ``kv_lens [B]`` how many of them
    are each row's (every attention layer caches the same tokens).  ``mamba[l]``: layer ``l``'s
    states, either in place (:class:`MambaSlots`) or as tensors ``(conv, ssm)``: conv state
    ``[B, conv_dim, K-1]`` (oldest input first) and SSM state ``[B, heads, head_dim, N]``
    (float32), for states vLLM's cache no longer holds (mock-AR's snapshot and catch-up).
    """

    kv: dict[int, PagedKV]
    kv_lens: torch.Tensor
    mamba: dict[int, MambaSlots | tuple[torch.Tensor, torch.Tensor]]

    def select(self, rows: torch.Tensor) -> BlockContext:
        """The context of a subset of the batch (no context keys/values are copied)."""
        return BlockContext(
            kv={i: kv.select(rows) for i, kv in self.kv.items()},
            kv_lens=self.kv_lens[rows.to(self.kv_lens.device)],
            mamba={
                i: state.select(rows) if isinstance(state, MambaSlots) else _rows(state, rows)
                for i, state in self.mamba.items()
            },
        )

    def mamba_states(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s ``(conv, ssm)`` states of the batch."""
        state = self.mamba[layer]
        return state.read() if isinstance(state, MambaSlots) else state


def _rows(
    state: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    conv, ssm = state
    return conv[rows.to(conv.device)], ssm[rows.to(ssm.device)]


@dataclass(frozen=True)
class MambaOptions:
    """Backbone-wide Mamba-2 settings the mixer module does not carry."""

    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    chunk_size: int = 128


def run_layers(
    layers: nn.ModuleList,
    x: torch.Tensor,
    context: BlockContext,
    *,
    modulation: torch.Tensor | None,
    causal: bool,
    block_lens: torch.Tensor,
    mamba_options: MambaOptions,
) -> tuple[torch.Tensor, MambaStates]:
    """Run ``x [B, S, H]`` through ``layers``; return the output and the final Mamba states.

    ``modulation [L, B, 3, H]`` (shift, scale, gate) applies adaLN-single per layer: before the
    norm for Mamba / attention layers, after it for feed-forward ones.  Row ``b``'s block is
    its first ``block_lens[b]`` positions; attention ignores the rest (Mamba is causal and the
    feed-forward layers per token, so trailing padding cannot reach real positions).
    """
    batch, size, _ = x.shape
    states: MambaStates = {}
    for i, layer in enumerate(layers):
        mod = modulation[i][:, :, None, :] if modulation is not None else None  # [B, 3, 1, H]
        sequence_mixer = isinstance(
            layer, NemotronHMambaDecoderLayer | NemotronHAttentionDecoderLayer
        )
        if mod is None:
            h = layer.norm(x)
        elif sequence_mixer:
            h = layer.norm(x * (1 + mod[:, 1]) + mod[:, 0])
        else:
            h = layer.norm(x) * (1 + mod[:, 1]) + mod[:, 0]
        if isinstance(layer, NemotronHMambaDecoderLayer):
            out, states[i] = _mamba(layer.mixer, h, *context.mamba_states(i), mamba_options)
        elif isinstance(layer, NemotronHAttentionDecoderLayer):
            out = _attention(layer.mixer, h, context.kv[i], context.kv_lens, block_lens, causal)
        else:
            out = layer.mixer(h.reshape(batch * size, -1)).view_as(h)
        x = x + (mod[:, 2] * out if mod is not None else out)
    return x, states


def _attention(
    mixer: nn.Module,
    h: torch.Tensor,
    context: PagedKV,
    kv_lens: torch.Tensor,
    block_lens: torch.Tensor,
    causal: bool,
) -> torch.Tensor:
    """Joint attention of every row's block over its context and its block, in one call.

    The context is read in place from vLLM's paged cache
    (:func:`~vllm_twotower.ops.paged_attention.paged_block_attention`); row ``b`` sees its
    first ``kv_lens[b]`` context keys and first ``block_lens[b]`` block keys.
    """
    batch, size, _ = h.shape
    view = vi.attention_mixer_view(mixer)
    qkv, _ = view.qkv_proj(h.reshape(batch * size, -1))
    q, k, v = qkv.split([view.q_size, view.kv_size, view.kv_size], dim=-1)
    q = q.view(batch, size, view.num_heads, view.head_dim)
    k = k.view(batch, size, view.num_kv_heads, view.head_dim)
    v = v.view(batch, size, view.num_kv_heads, view.head_dim)
    out = paged_block_attention(
        q, k, v, context, kv_lens, block_lens, scale=view.scaling, causal=causal
    )
    result, _ = view.o_proj(out.reshape(batch * size, -1))
    return result.view(batch, size, -1)


def _mamba(
    mixer: nn.Module,
    h: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    options: MambaOptions,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The Mamba-2 mixer over every row's block from its context states, in one batched scan."""
    batch, size, _ = h.shape
    view = vi.mamba_mixer_view(mixer)
    proj, _ = view.in_proj(h.reshape(batch * size, -1))
    z, xbc, dt = torch.split(
        proj.view(batch, size, -1),
        [view.intermediate_size, view.conv_size, view.num_heads],
        dim=-1,
    )
    heads = view.num_heads
    head_dim = view.intermediate_size // heads
    conv_out, conv_final = causal_conv1d(
        xbc, view.conv_weight, view.conv_bias, conv_state.to(xbc.dtype)
    )
    x, bm, cm = view.split_xbc(F.silu(conv_out))
    groups = bm.shape[-1] // view.state_size

    def per_head(m: torch.Tensor) -> torch.Tensor:
        m = m.reshape(batch, size, groups, view.state_size).float()
        return m.repeat_interleave(heads // groups, dim=-2)

    step = F.softplus(dt.float() + view.dt_bias.float()).clamp(*options.time_step_limit)
    xh = x.reshape(batch, size, heads, head_dim).float()
    y, ssm_final = ssd_chunk_scan(
        xh,
        step,
        view.A.float(),
        per_head(bm),
        per_head(cm),
        ssm_state.float(),
        options.chunk_size,
    )
    y = (y + view.D.float()[:, None] * xh).reshape(batch * size, -1).to(h.dtype)
    y = view.norm(y, z.reshape(batch * size, -1))
    out, _ = view.out_proj(y)
    return out.view(batch, size, -1), (conv_final, ssm_final)

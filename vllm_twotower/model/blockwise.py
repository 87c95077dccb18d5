"""Nemotron-H layers run over a block of tokens on top of a read-only context.

Both uses of a TwoTower tower outside vLLM's own forward go through :func:`run_layers`:

* the denoiser pass: a block attends, without a mask, to the context keys/values of the same
  layer plus the whole block, and its Mamba scans start from the context's states;
* mock-AR's catch-up of the context tower over a few tokens (causal attention, states kept).

The layers are vLLM's Nemotron-H decoder layers; only their projections, norms and parameters
are used, never their ``forward`` (which would read and write vLLM's caches).  The
sequence math (causal conv, SSD scan, attention) is the reference implementation's, so the
engine and the oracle agree on the same inputs; every row of the batch goes through each of
them in one call (contexts padded to one length and masked), so a pass costs the same number
of operations at any batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.models.nemotron_h import (
    NemotronHAttentionDecoderLayer,
    NemotronHMambaDecoderLayer,
)

from vllm_twotower import vllm_internals as vi
from vllm_twotower.reference.attention import attend
from vllm_twotower.reference.mamba2 import causal_conv1d, ssd_chunk_scan

MambaStates = dict[int, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class BlockContext:
    """What a block pass reads of the context tower, for a batch of ``B`` rows.

    ``kv[l] = (k, v)``: context keys/values of attention layer ``l``,
    ``[B, P, kv_heads, head_dim]`` padded to the longest context; ``kv_lens [B]`` how many of
    the ``P`` positions are each row's (every attention layer caches the same tokens).
    ``mamba[l] = (conv, ssm)``: layer ``l``'s conv state ``[B, conv_dim, K-1]`` (oldest input
    first) and SSM state ``[B, heads, head_dim, N]`` (float32).
    """

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    kv_lens: torch.Tensor
    mamba: MambaStates

    def select(self, rows: torch.Tensor) -> BlockContext:
        """The context of a subset of the batch."""
        return BlockContext(
            kv={i: (k[rows], v[rows]) for i, (k, v) in self.kv.items()},
            kv_lens=self.kv_lens[rows],
            mamba={i: (c[rows], s[rows]) for i, (c, s) in self.mamba.items()},
        )

    def key_mask(
        self, block_lens: torch.Tensor, size: int, device: torch.device
    ) -> torch.Tensor | None:
        """``[B, P + size]``: the keys each row may attend to, its context then its block.

        Built once per pass, on the pass's device (every attention layer shares it); ``None``
        when there is no attention layer.
        """
        if not self.kv:
            return None
        padded = next(iter(self.kv.values()))[0].shape[1]
        context = torch.arange(padded, device=device)[None, :] < self.kv_lens.to(device)[:, None]
        block = torch.arange(size, device=device)[None, :] < block_lens.to(device)[:, None]
        return torch.cat([context, block], dim=1)


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
    key_mask = context.key_mask(block_lens, size, x.device)
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
            out, states[i] = _mamba(layer.mixer, h, *context.mamba[i], mamba_options)
        elif isinstance(layer, NemotronHAttentionDecoderLayer):
            out = _attention(layer.mixer, h, *context.kv[i], key_mask, causal)
        else:
            out = layer.mixer(h.reshape(batch * size, -1)).view_as(h)
        x = x + (mod[:, 2] * out if mod is not None else out)
    return x, states


def _attention(
    mixer: nn.Module,
    h: torch.Tensor,
    ctx_k: torch.Tensor,
    ctx_v: torch.Tensor,
    key_mask: torch.Tensor,
    causal: bool,
) -> torch.Tensor:
    """Joint attention of every row's block over its context and its block, in one call.

    Keys are ``concat(context padded to P, block)``; ``key_mask`` (see
    :meth:`BlockContext.key_mask`) masks out each row's padding.
    """
    batch, size, _ = h.shape
    view = vi.attention_mixer_view(mixer)
    qkv, _ = view.qkv_proj(h.reshape(batch * size, -1))
    q, k, v = qkv.split([view.q_size, view.kv_size, view.kv_size], dim=-1)
    q = q.view(batch, size, view.num_heads, view.head_dim)
    k = k.view(batch, size, view.num_kv_heads, view.head_dim)
    v = v.view(batch, size, view.num_kv_heads, view.head_dim)
    keys = torch.cat([ctx_k.to(k.dtype), k], dim=1)
    values = torch.cat([ctx_v.to(v.dtype), v], dim=1)
    out = attend(q, keys, values, causal=causal, scale=view.scaling, key_mask=key_mask)
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

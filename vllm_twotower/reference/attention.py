"""Nemotron-H attention: GQA with no positional encoding, over a cache of past keys/values.

One function serves both towers.  The context tower attends causally over its cached past
plus the new tokens (and keeps the extended cache); the denoiser's *joint* attention attends,
without any mask, over the context tower's cache of the same layer plus the whole block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of ``q [T, nq, d]`` over ``k, v [P+T, nkv, d]`` (float32+ softmax).

    The last ``T`` keys belong to the queries' own tokens; the first ``P`` are the past.  With
    ``causal`` a query at block offset ``i`` sees the past and offsets ``<= i``; without it, all.
    Query heads are grouped onto key/value heads (GQA).  Leading batch dimensions are allowed.
    One ``scaled_dot_product_attention`` call (computed in at least float32): the engine runs
    this for every attention layer of every denoiser pass, where the op count sets the cost.
    ``key_mask [..., P+T]`` (bool) marks the keys that exist: a batch of sequences padded to
    one length attends in one call, each row ignoring its padding.
    """
    length = q.shape[-3]
    total = k.shape[-3]
    compute = torch.promote_types(q.dtype, torch.float32)
    allowed = None
    if causal:
        past = total - length
        allowed = torch.ones(length, total, dtype=torch.bool, device=q.device).tril(diagonal=past)
    if key_mask is not None:
        keys = key_mask[..., None, None, :]  # [..., 1 (heads), 1 (queries), P+T]
        allowed = keys if allowed is None else keys & allowed
    out = F.scaled_dot_product_attention(
        q.to(compute).transpose(-3, -2),
        k.to(compute).transpose(-3, -2),
        v.to(compute).transpose(-3, -2),
        attn_mask=allowed,
        scale=scale,
        enable_gqa=q.shape[-2] != k.shape[-2],
    )
    return out.transpose(-3, -2).to(q.dtype)


class Attention(nn.Module):
    """Checkpoint-shaped attention mixer (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def empty_cache(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of an empty context, ``[0, nkv, d]`` each."""
        shape = (0, self.num_kv_heads, self.head_dim)
        dtype = self.k_proj.weight.dtype
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(
            shape, dtype=dtype, device=device
        )

    def forward(
        self,
        hidden: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        *,
        causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attend ``hidden [T, H]`` over past + own keys; return ``(out, all_k, all_v)``."""
        q = self.q_proj(hidden).unflatten(-1, (self.num_heads, self.head_dim))
        k_new = self.k_proj(hidden).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v_new = self.v_proj(hidden).unflatten(-1, (self.num_kv_heads, self.head_dim))
        k = torch.cat([past_k, k_new], dim=-3)
        v = torch.cat([past_v, v_new], dim=-3)
        out = attend(q, k, v, causal=causal, scale=self.head_dim**-0.5)
        return self.o_proj(out.flatten(-2)), k, v

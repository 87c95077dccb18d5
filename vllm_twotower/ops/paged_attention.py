"""The denoiser's joint attention read straight from vLLM's paged KV cache.

``torch.ops.twotower.paged_block_attention`` (``csrc/paged_attention*``) attends every row's
block of queries to the row's context keys/values where vLLM keeps them (through the row's block
table) and to the block's own keys/values, with an online softmax accumulated in float32: no
dense copy of the context and no float32 copy of it.  Its torch fallback,
:func:`paged_block_attention` with the kernel unavailable or ``use_kernel=False``, gathers one
layer's context into a dense padded copy (:func:`gather_paged`) and runs the reference
:func:`~vllm_twotower.reference.attention.attend` over it: it defines the semantics, and the
kernel is tested against it and against ``attend`` on the keys vLLM was given.

Where an element lives is described by :class:`PagedKV`, backend-neutrally: element ``(p, c)``
of kv head ``h`` of a row is at ``cache[block_table[p // N]] + h * head stride + offsets[p % N,
c]`` (element offsets from the block and head's first element), so the CPU backend's
ISA-specific block interior and every dense ``[B, H, N, K|V]`` stride order read alike.  The
offsets come from :mod:`vllm_twotower.engine.context_reader`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vllm_twotower.ops import extension_available, has_kernel
from vllm_twotower.reference.attention import attend

__all__ = ["PagedKV", "gather_paged", "paged_block_attention", "paged_kernel_supports"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 256  # kMaxHeadDim in csrc/paged_attention.h


@dataclass(frozen=True)
class PagedKV:
    """One attention layer's context keys/values for a batch of rows, in place in vLLM's cache.

    ``cache``: the layer's ``[B, H, N, C]`` view (never copied); ``block_table [R, M]``: each
    row's kernel block ids (int64, on the cache's device); ``k_offsets`` / ``v_offsets``
    ``[N, head_dim]``: element offsets of token ``n``'s channel ``c`` from ``cache[b, h]``'s first
    element.
    """

    cache: torch.Tensor
    block_table: torch.Tensor
    k_offsets: torch.Tensor
    v_offsets: torch.Tensor

    def select(self, rows: torch.Tensor) -> PagedKV:
        """The same layer for a subset of the rows (only the block table is indexed)."""
        return replace(self, block_table=self.block_table[rows.to(self.block_table.device)])


def gather_paged(kv: PagedKV, kv_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[R, P, kv_heads, head_dim]`` keys and values, ``P = max(kv_lens, 1)``.

    Positions past a row's length hold whatever its blocks hold (callers mask them).  One index
    computation serves every layout: ``as_strided`` over the cache's storage from its first
    element, indexed with absolute element offsets.
    """
    cache = kv.cache
    n, _ = kv.k_offsets.shape
    blocks, heads = cache.shape[:2]
    block_stride, head_stride = cache.stride(0), cache.stride(1)
    length = max(int(kv_lens.max()), 1) if kv_lens.numel() else 1
    pos = torch.arange(length, device=cache.device)
    table = kv.block_table.to(cache.device)
    base = table[:, pos // n, None] * block_stride  # [R, P, 1]
    base = base + torch.arange(heads, device=cache.device) * head_stride  # [R, P, H]
    extent = (blocks - 1) * block_stride + (heads - 1) * head_stride
    extent += int(torch.maximum(kv.k_offsets.max(), kv.v_offsets.max())) + 1
    flat = cache.as_strided((extent,), (1,))

    def read(offsets: torch.Tensor) -> torch.Tensor:
        return flat[base[..., None] + offsets.to(cache.device)[pos % n][:, None, :]]

    return read(kv.k_offsets), read(kv.v_offsets)


def context_key_mask(
    kv_lens: torch.Tensor, padded: int, block_lens: torch.Tensor, size: int, device: torch.device
) -> torch.Tensor:
    """``[R, padded + size]``: the keys each row may attend to, its context then its block."""
    context = torch.arange(padded, device=device)[None, :] < kv_lens.to(device)[:, None]
    block = torch.arange(size, device=device)[None, :] < block_lens.to(device)[:, None]
    return torch.cat([context, block], dim=1)


def paged_kernel_supports(q: torch.Tensor, kv: PagedKV) -> bool:
    """Whether the compiled op can run these inputs (else the gather + ``attend`` fallback)."""
    return (
        q.dtype in _DTYPES
        and kv.cache.dtype == q.dtype
        and kv.cache.device == q.device
        and q.shape[-1] <= _MAX_HEAD_DIM
        and has_kernel("paged_block_attention", q.device)
    )


def paged_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context: PagedKV,
    kv_lens: torch.Tensor,
    block_lens: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    use_kernel: bool = True,
) -> torch.Tensor:
    """Attention of ``q [R, S, nq, d]`` over each row's context and its block ``k, v [R, S,
    nkv, d]``.

    Row ``r`` sees its first ``kv_lens[r]`` context keys and its first ``block_lens[r]`` block
    keys (with ``causal``, block keys up to the query's own position).  ``use_kernel=False``
    or ``TWOTOWER_DISABLE_KERNELS=1`` forces the fallback.
    """
    if use_kernel and paged_kernel_supports(q, context):
        device = q.device
        return torch.ops.twotower.paged_block_attention(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            context.cache,
            context.block_table.to(device, torch.long).contiguous(),
            kv_lens.to(device, torch.long).contiguous(),
            block_lens.to(device, torch.long).contiguous(),
            context.k_offsets.to(device, torch.long).contiguous(),
            context.v_offsets.to(device, torch.long).contiguous(),
            scale,
            causal,
        )
    ctx_k, ctx_v = gather_paged(context, kv_lens)
    keys = torch.cat([ctx_k.to(q.device, k.dtype), k], dim=1)
    values = torch.cat([ctx_v.to(q.device, v.dtype), v], dim=1)
    mask = context_key_mask(kv_lens, ctx_k.shape[1], block_lens, q.shape[1], q.device)
    return attend(q, keys, values, causal=causal, scale=scale, key_mask=mask)


def _register_fake() -> None:
    """Shape-only implementation so ``torch.compile`` / fake tensors can trace through the op."""

    @torch.library.register_fake("twotower::paged_block_attention")
    def _fake(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: torch.Tensor,
        block_table: torch.Tensor,
        kv_lens: torch.Tensor,
        block_lens: torch.Tensor,
        k_offsets: torch.Tensor,
        v_offsets: torch.Tensor,
        scale: float,
        causal: bool,
    ) -> torch.Tensor:
        return torch.empty_like(q, memory_format=torch.contiguous_format)


if extension_available():
    _register_fake()

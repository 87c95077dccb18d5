"""Read-only access to the context tower's caches for the denoiser.

After the context pass of a step, vLLM's caches hold, for every request, the attention keys /
values of all its tokens (paged, addressed through the request's block table) and the Mamba
conv / SSM state after its last token (one state slot, addressed through the Mamba group's
block table).  :class:`ContextReader` describes where they are, for a set of batch rows, as the
:class:`~vllm_twotower.model.blockwise.BlockContext` the denoiser consumes: block tables and
element offsets (:class:`~vllm_twotower.ops.paged_attention.PagedKV`) and state slots
(:class:`~vllm_twotower.model.blockwise.MambaSlots`).  Nothing is copied: the denoiser's
attention reads the cache in place, and each Mamba layer reads its rows' slots when a pass
reaches it.  It never writes.

vLLM binds every attention layer's cache as a logical ``[B, H, N, C]`` view (RFC #42082:
kernel blocks, head slots, stored states, content); the physical order of those axes
(``KVCacheLayout``: layer- or block-outermost, head- or token-major) lives only in the view's
strides, so indexing the view reads any of them.  What a cell holds depends on the backend:

* The CPU attention backend stores the inside of a KV block in an ISA-specific order (on
  AVX-512 ``vec``, keys are stored transposed: ``[head_dim, block_size]`` per block and head,
  values plainly).  Rather than hard-coding layouts, :func:`probe_block_layout` asks vLLM's own
  ``cpu_attn_reshape_and_cache`` where each (token, channel) lands in a scratch block, once per
  layout; the resulting offset maps are what the attention kernel reads through.
* Every other backend that keeps the layer's :class:`AttentionSpec` dense (no packed head
  slots or content, no quantization, one token per state; FlashAttention, FlashInfer, Triton,
  FlexAttention) reads the view as one token per row ``N``, keys then values along ``C``; its
  offset maps are the view's strides.  Backends that pack differently declare
  it in the spec (``customize_spec``), which :func:`dense_kernel_block_size` checks, together
  with the view's shape against vLLM's own ``compute_layer_kv_cache_shape_bytes``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import torch

from vllm_twotower import vllm_internals as vi
from vllm_twotower.model.blockwise import BlockContext, MambaSlots, MambaStates
from vllm_twotower.ops.paged_attention import PagedKV

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def layer_index(layer_name: str) -> int:
    """``model.layers.6.mixer.attn`` -> 6."""
    match = _LAYER_INDEX.search(layer_name)
    if match is None:
        raise ValueError(f"cannot find a layer index in {layer_name!r}")
    return int(match.group(1))


@functools.cache
def probe_block_layout(
    isa: str, dtype: torch.dtype, block_size: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat offsets ``[block_size, head_dim]`` of K and V elements inside one block and head.

    Writes token/channel codes through ``cpu_attn_reshape_and_cache`` into a one-block,
    one-head scratch cache and reads back where each landed.  Codes are written in two
    base-128 digits so they stay exact in bfloat16 and float16.
    """
    cells = block_size * head_dim
    code = torch.arange(cells).view(block_size, 1, head_dim)
    digits = []
    for part in (code % 128, code // 128):
        cache = torch.zeros(1, 1, block_size * 2, head_dim, dtype=dtype)
        key_cache, value_cache = cache.chunk(2, dim=2)
        value = part.to(dtype)
        vi.cpu_attention_write(value, value, key_cache, value_cache, torch.arange(block_size), isa)
        digits.append((key_cache.reshape(-1).long(), value_cache.reshape(-1).long()))
    k_code = digits[0][0] + 128 * digits[1][0]
    v_code = digits[0][1] + 128 * digits[1][1]
    k_offsets = torch.empty(cells, dtype=torch.long)
    v_offsets = torch.empty(cells, dtype=torch.long)
    k_offsets[k_code] = torch.arange(cells)
    v_offsets[v_code] = torch.arange(cells)
    return k_offsets.view(block_size, head_dim), v_offsets.view(block_size, head_dim)


def dense_kernel_block_size(attention: torch.nn.Module, spec: Any) -> int:
    """Tokens per block of ``attention.kv_cache``, a dense ``[B, kv_heads, N, K|V]`` view.

    The per-layer view is always ``[B, H, N, C]``; the spec says what fills it.  A dense spec
    (no packed head slots or content, no quantization, one token per state) means
    ``H = kv_heads`` and ``C = head_size + head_size_v`` with keys first, which is how the
    FlashAttention, FlashInfer, Triton and FlexAttention backends split it.  ``N`` can be
    smaller than ``spec.block_size`` when vLLM splits manager blocks into kernel blocks
    (``prepare_kernel_block_sizes``), hence it is read from the view and checked against
    ``compute_layer_kv_cache_shape_bytes``.  Anything else raises ``NotImplementedError``
    naming the backend and shape, rather than reading garbage.
    """
    cache = vi.layer_cache(attention)
    backend = vi.attention_backend_name(attention)
    found = f"{backend} cache of shape {tuple(cache.shape)} ({cache.dtype})"
    if spec is None:
        raise NotImplementedError(f"no attention spec for the {found}")
    if vi.dense_view_shape(spec, spec.block_size) is None:
        raise NotImplementedError(
            f"reading a packed or quantized KV cache is not implemented: {found}, {spec}; "
            "see docs/engine-design.md"
        )
    if cache.dim() == 4 and cache.dtype == spec.dtype and spec.block_size % cache.shape[2] == 0:
        kernel_block_size = cache.shape[2]
        if vi.dense_view_shape(spec, kernel_block_size) == (
            *cache.shape[1:3],
            cache.shape[3] * cache.element_size(),
        ):
            return kernel_block_size
    raise NotImplementedError(
        f"the {found} is not the dense [blocks, {spec.num_kv_heads} kv_heads, tokens, "
        f"{spec.head_size}+{spec.head_size_v}] view vLLM binds for {spec}; "
        "see docs/engine-design.md"
    )


def kernel_block_table(
    table: torch.Tensor, manager_block_size: int, kernel_block_size: int
) -> torch.Tensor:
    """Block ``table [R, M]`` in kernel blocks ``[R, M * ratio]``.

    vLLM's block tables hold KV-manager block ids; when a backend needs smaller blocks the
    bound view addresses kernel blocks, kernel block ``j`` of block ``b`` being
    ``b * ratio + j`` (``AttentionGroup.map_to_kernel_block_table``; the other stride vLLM
    knows, for packed caches, exists only for compressed caches, which are refused above).
    """
    ratio = manager_block_size // kernel_block_size
    if ratio == 1:
        return table.long()
    offsets = torch.arange(ratio, device=table.device)
    return (table.long().unsqueeze(-1) * ratio + offsets).flatten(1)


@dataclass(frozen=True)
class _AttentionLayer:
    index: int
    group: int
    module: torch.nn.Module
    spec: Any  # vLLM's AttentionSpec


@dataclass(frozen=True)
class _MambaLayer:
    index: int
    group: int
    module: torch.nn.Module


class ContextReader:
    """Points the denoiser at the context tower's KV and Mamba states of batch rows."""

    def __init__(self, runner: object) -> None:
        self.runner = runner
        self.attention: list[_AttentionLayer] = []
        self.mamba: list[_MambaLayer] = []
        self.mamba_specs: dict[int, Any] = {}
        for layer in vi.cached_layers(runner):
            if vi.is_mamba_spec(layer.spec):
                self.mamba.append(_MambaLayer(layer_index(layer.name), layer.group, layer.module))
                self.mamba_specs[layer.group] = layer.spec
            elif vi.is_attention_spec(layer.spec):
                self.attention.append(
                    _AttentionLayer(layer_index(layer.name), layer.group, layer.module, layer.spec)
                )

    def read(self, rows: torch.Tensor, kv_lens: torch.Tensor) -> BlockContext:
        """Context of batch ``rows``: their first ``kv_lens [R]`` cached keys/values of each
        attention layer and their Mamba state slots, all in place (nothing is copied)."""
        kv = {}
        for layer in self.attention:
            table = vi.block_table_rows(self.runner, layer.group, rows)
            kv[layer.index] = paged_layer_kv(layer.module, table, layer.spec)
        return BlockContext(
            kv=kv, kv_lens=kv_lens.to(self.runner.device), mamba=dict(self.mamba_slots(rows))
        )

    def mamba_slots(self, rows: torch.Tensor) -> dict[int, MambaSlots]:
        """Every Mamba layer's conv / SSM state slots of batch ``rows``, in place."""
        dim_first = vi.conv_state_dim_first()
        mamba = {}
        for layer in self.mamba:
            spec = self.mamba_specs[layer.group]
            slots = vi.mamba_state_slots(self.runner, layer.group, spec, rows)
            conv_cache, ssm_cache = vi.layer_cache(layer.module)[:2]
            mamba[layer.index] = MambaSlots(conv_cache, ssm_cache, slots, dim_first)
        return mamba

    def read_mamba(self, rows: torch.Tensor) -> MambaStates:
        """Copies of the Mamba conv (``[R, conv_dim, K-1]``) and SSM states of batch ``rows``
        (mock-AR keeps them across the context pass, which overwrites the slots)."""
        return {i: state.read() for i, state in self.mamba_slots(rows).items()}


def paged_layer_kv(attention: torch.nn.Module, table: torch.Tensor, spec: Any = None) -> PagedKV:
    """Where an attention layer's cache keeps the context of the rows of block ``table [R,
    max_blocks]`` (KV-manager block ids).

    The CPU backend (which tags its layers with ``isa``) has its own block interior; every other
    backend must bind the dense view described by the layer's ``spec``.
    """
    isa = vi.cpu_attention_isa(attention)
    if isa is not None:
        return _cpu_paged_kv(attention, isa, table)
    return _dense_paged_kv(attention, table, spec)


def _dense_paged_kv(attention: torch.nn.Module, table: torch.Tensor, spec: Any) -> PagedKV:
    """A dense ``[B, kv_heads, N, K|V]`` view (GPU backends): token ``n``'s channel ``c`` is at
    ``n * stride(2) + c * stride(3)`` from its block and head, keys then values along ``C``.

    The view's strides carry its physical permutation, so no ``KVCacheLayout`` case needs
    handling here; block table entries are converted to kernel blocks.
    """
    kernel_block_size = dense_kernel_block_size(attention, spec)
    cache = vi.layer_cache(attention)
    if spec.head_size_v != spec.head_size:
        raise NotImplementedError(
            f"keys and values of different sizes ({spec.head_size}, {spec.head_size_v}) are not "
            "implemented; see docs/engine-design.md"
        )
    token = torch.arange(kernel_block_size)[:, None] * cache.stride(2)
    channel = torch.arange(spec.head_size)[None, :] * cache.stride(3)
    blocks = kernel_block_table(table, spec.block_size, kernel_block_size)
    return PagedKV(
        cache=cache,
        block_table=blocks.to(cache.device),
        k_offsets=(token + channel).to(cache.device),
        v_offsets=(token + channel + spec.head_size * cache.stride(3)).to(cache.device),
    )


def _cpu_paged_kv(attention: torch.nn.Module, isa: str, table: torch.Tensor) -> PagedKV:
    """The CPU backend's ``[B, kv_heads, N, 2 * head_dim]`` cache, read through the block
    interior :func:`probe_block_layout` learnt from vLLM's own writer (keys fill the first
    ``N * head_dim`` elements of a block and head, values the rest)."""
    cache = vi.layer_cache(attention)
    if cache.dim() != 4 or cache.stride(3) != 1 or cache.stride(2) != cache.shape[3]:
        raise NotImplementedError(
            f"unexpected CPU attention cache of shape {tuple(cache.shape)}, strides "
            f"{cache.stride()}; see docs/engine-design.md"
        )
    _, _, block_size, two_d = cache.shape
    head_dim = two_d // 2
    k_off, v_off = probe_block_layout(isa, cache.dtype, block_size, head_dim)
    return PagedKV(
        cache=cache,
        block_table=table.long(),
        k_offsets=k_off,
        v_offsets=v_off + block_size * head_dim,
    )

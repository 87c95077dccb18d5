"""Read-only access to the context tower's caches for the denoiser.

After the context pass of a step, vLLM's caches hold, for every request, the attention keys /
values of all its tokens (paged, addressed through the request's block table) and the Mamba
conv / SSM state after its last token (one state slot, addressed through the Mamba group's
block table).  :class:`ContextReader` gathers them, for a set of batch rows, into the dense
:class:`~vllm_twotower.model.denoiser.DenoiserContext` the denoiser consumes.  It never writes.

The CPU attention backend stores the inside of a KV block in an ISA-specific order (on AVX-512
``vec``, keys are stored transposed: ``[head_dim, block_size]`` per block and head, values
plainly).  Rather than hard-coding layouts, :func:`probe_block_layout` asks vLLM's own
``cpu_attn_reshape_and_cache`` where each (token, channel) lands in a scratch block, once per
layout, and reads through the resulting index map.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
from vllm.v1.attention.backends.utils import mamba_get_block_table_tensor
from vllm.v1.kv_cache_interface import AttentionSpec, MambaSpec

from vllm_twotower.model.blockwise import BlockContext, MambaStates

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
    from vllm import _custom_ops as ops

    cells = block_size * head_dim
    code = torch.arange(cells).view(block_size, 1, head_dim)
    digits = []
    for part in (code % 128, code // 128):
        cache = torch.zeros(1, 1, block_size * 2, head_dim, dtype=dtype)
        key_cache, value_cache = cache.chunk(2, dim=2)
        value = part.to(dtype)
        ops.cpu_attn_reshape_and_cache(
            value, value, key_cache, value_cache, torch.arange(block_size), isa
        )
        digits.append((key_cache.reshape(-1).long(), value_cache.reshape(-1).long()))
    k_code = digits[0][0] + 128 * digits[1][0]
    v_code = digits[0][1] + 128 * digits[1][1]
    k_offsets = torch.empty(cells, dtype=torch.long)
    v_offsets = torch.empty(cells, dtype=torch.long)
    k_offsets[k_code] = torch.arange(cells)
    v_offsets[v_code] = torch.arange(cells)
    return k_offsets.view(block_size, head_dim), v_offsets.view(block_size, head_dim)


@dataclass(frozen=True)
class _AttentionLayer:
    index: int
    group: int
    module: torch.nn.Module


@dataclass(frozen=True)
class _MambaLayer:
    index: int
    group: int
    module: torch.nn.Module


class ContextReader:
    """Gathers the context tower's KV and Mamba states of batch rows for the denoiser."""

    def __init__(self, runner: object) -> None:
        self.runner = runner
        forward_context = runner.compilation_config.static_forward_context
        self.attention: list[_AttentionLayer] = []
        self.mamba: list[_MambaLayer] = []
        self.mamba_specs: dict[int, MambaSpec] = {}
        for gid, group in enumerate(runner.kv_cache_config.kv_cache_groups):
            for name in group.layer_names:
                module = forward_context[name]
                if isinstance(group.kv_cache_spec, MambaSpec):
                    self.mamba.append(_MambaLayer(layer_index(name), gid, module))
                    self.mamba_specs[gid] = group.kv_cache_spec
                elif isinstance(group.kv_cache_spec, AttentionSpec):
                    self.attention.append(_AttentionLayer(layer_index(name), gid, module))

    def read(self, rows: torch.Tensor, kv_lens: torch.Tensor) -> BlockContext:
        """Context of batch ``rows``: the first ``kv_lens [R]`` cached keys/values of each
        attention layer and the Mamba states in the rows' state slots."""
        block_tables = self.runner.input_batch.block_table
        kv = {}
        for layer in self.attention:
            table = block_tables[layer.group].block_table.cpu[rows]
            kv[layer.index] = (*self._gather_kv(layer.module, table, kv_lens), kv_lens)
        return BlockContext(kv=kv, mamba=self.read_mamba(rows))

    def read_mamba(self, rows: torch.Tensor) -> MambaStates:
        """Copies of the Mamba conv (``[R, conv_dim, K-1]``) and SSM states of batch ``rows``."""
        from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first

        runner = self.runner
        num_reqs = runner.input_batch.num_reqs
        seq_lens = runner.optimistic_seq_lens_cpu[:num_reqs]
        mamba = {}
        for layer in self.mamba:
            table = runner.input_batch.block_table[layer.group].block_table.cpu[:num_reqs]
            slots = mamba_get_block_table_tensor(
                table, seq_lens, self.mamba_specs[layer.group], runner.cache_config.mamba_cache_mode
            )[:, 0].long()[rows]
            conv_cache, ssm_cache = layer.module.kv_cache[:2]
            conv = conv_cache[slots]
            if not is_conv_state_dim_first():
                conv = conv.transpose(-1, -2)
            mamba[layer.index] = (conv, ssm_cache[slots])
        return mamba

    @staticmethod
    def _gather_kv(
        attention: torch.nn.Module, table: torch.Tensor, seq_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``[R, P, kv_heads, head_dim]`` keys and values, ``P = max(seq_lens)``."""
        cache = attention.kv_cache
        if cache.dim() != 4 or not hasattr(attention, "isa"):
            raise NotImplementedError(
                "reading the paged KV cache is implemented for vLLM's CPU attention backend "
                f"only (got a cache of shape {tuple(cache.shape)}); see docs/engine-design.md"
            )
        num_blocks, kv_heads, block_size, two_d = cache.shape
        head_dim = two_d // 2
        k_off, v_off = probe_block_layout(attention.isa, cache.dtype, block_size, head_dim)
        rows = table.shape[0]
        length = max(int(seq_lens.max()), 1)
        used = -(-length // block_size)
        # One block and head holds 2 * block_size * head_dim elements: keys, then values.
        flat = cache.view(num_blocks, kv_heads, 2 * block_size * head_dim)
        data = flat[table[:, :used].long()]  # [R, used, H, 2*bs*D]

        def unpack(offsets: torch.Tensor) -> torch.Tensor:
            out = data[..., offsets.reshape(-1)].view(rows, used, kv_heads, block_size, head_dim)
            return out.transpose(2, 3).reshape(rows, used * block_size, kv_heads, head_dim)

        keys = unpack(k_off)[:, :length]
        values = unpack(v_off + block_size * head_dim)[:, :length]
        return keys, values

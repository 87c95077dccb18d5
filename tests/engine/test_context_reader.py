"""The paged-KV reader agrees with what vLLM's CPU attention kernel writes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_twotower.engine.context_reader import layer_index, paged_layer_kv, probe_block_layout
from vllm_twotower.ops.paged_attention import gather_paged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_reads_back_what_the_kernel_wrote(dtype: torch.dtype) -> None:
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    blocks, heads, block_size, head_dim = 6, 2, 32, 32
    isa = _get_attn_isa(dtype, block_size, head_dim)
    cache = torch.zeros(blocks, heads, block_size, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = cache.view(blocks, heads, 2 * block_size, head_dim).chunk(2, dim=2)
    lengths = torch.tensor([70, 33])
    tables = torch.tensor([[4, 1, 5], [2, 0, 3]], dtype=torch.int32)
    written = []
    for row, n in enumerate(lengths.tolist()):
        k = torch.randn(n, heads, head_dim).to(dtype)
        v = torch.randn(n, heads, head_dim).to(dtype)
        pos = torch.arange(n)
        slots = tables[row, pos // block_size].long() * block_size + pos % block_size
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
        written.append((k, v))
    layer = SimpleNamespace(kv_cache=cache, isa=isa)
    keys, values = gather_paged(paged_layer_kv(layer, tables), lengths)
    for row, (k, v) in enumerate(written):
        n = k.shape[0]
        assert torch.equal(keys[row, :n], k)
        assert torch.equal(values[row, :n], v)


def test_layout_probe_is_a_permutation() -> None:
    k_off, v_off = probe_block_layout("vec", torch.float32, 32, 64)
    for off in (k_off, v_off):
        assert torch.equal(off.flatten().sort().values, torch.arange(32 * 64))


def test_layer_index() -> None:
    assert layer_index("model.layers.6.mixer.attn") == 6
    assert layer_index("model.layers.12.mixer") == 12

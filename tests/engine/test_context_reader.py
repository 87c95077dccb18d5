"""The paged-KV reader agrees with what vLLM's CPU attention kernel writes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_twotower.engine.context_reader import layer_index, paged_layer_kv, probe_block_layout
from vllm_twotower.ops.paged_attention import gather_paged, paged_block_attention
from vllm_twotower.reference.attention import attend


def write_cpu_cache(
    dtype: torch.dtype, lengths: list[int], tables: torch.Tensor
) -> tuple[SimpleNamespace, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A CPU-backend attention layer whose cache vLLM's own writer filled for ``lengths``."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    blocks, heads, block_size, head_dim = 6, 2, 32, 32
    isa = _get_attn_isa(dtype, block_size, head_dim)
    cache = torch.zeros(blocks, heads, block_size, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = cache.view(blocks, heads, 2 * block_size, head_dim).chunk(2, dim=2)
    written = []
    for row, n in enumerate(lengths):
        k = torch.randn(n, heads, head_dim).to(dtype)
        v = torch.randn(n, heads, head_dim).to(dtype)
        pos = torch.arange(n)
        slots = tables[row, pos // block_size].long() * block_size + pos % block_size
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
        written.append((k, v))
    return SimpleNamespace(kv_cache=cache, isa=isa), written


TABLES = torch.tensor([[4, 1, 5], [2, 0, 3]], dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_reads_back_what_the_kernel_wrote(dtype: torch.dtype) -> None:
    lengths = torch.tensor([70, 33])
    layer, written = write_cpu_cache(dtype, lengths.tolist(), TABLES)
    keys, values = gather_paged(paged_layer_kv(layer, TABLES), lengths)
    for row, (k, v) in enumerate(written):
        n = k.shape[0]
        assert torch.equal(keys[row, :n], k)
        assert torch.equal(values[row, :n], v)


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_over_what_the_kernel_wrote(dtype: torch.dtype, use_kernel: bool) -> None:
    """Block queries over vLLM's CPU cache, read in place through the probed block interior,
    against the reference ``attend`` over the keys as they were written."""
    lengths = [70, 33]
    layer, written = write_cpu_cache(dtype, lengths, TABLES)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 16, h, 32, generator=gen).to(dtype) for h in (4, 2, 2))
    block_lens = torch.tensor([16, 9])
    out = paged_block_attention(
        q,
        k,
        v,
        paged_layer_kv(layer, TABLES),
        torch.tensor(lengths),
        block_lens,
        scale=32**-0.5,
        causal=False,
        use_kernel=use_kernel,
    )
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 0}
    for row, (ctx_k, ctx_v) in enumerate(written):
        n = int(block_lens[row])
        keys, values = torch.cat([ctx_k, k[row, :n]]), torch.cat([ctx_v, v[row, :n]])
        expected = attend(q[row, :n], keys, values, causal=False, scale=32**-0.5)
        torch.testing.assert_close(out[row, :n], expected, **tol)


def test_layout_probe_is_a_permutation() -> None:
    k_off, v_off = probe_block_layout("vec", torch.float32, 32, 64)
    for off in (k_off, v_off):
        assert torch.equal(off.flatten().sort().values, torch.arange(32 * 64))


def test_layer_index() -> None:
    assert layer_index("model.layers.6.mixer.attn") == 6
    assert layer_index("model.layers.12.mixer") == 12

"""The paged-KV reader agrees with what vLLM's GPU attention backends write (on CPU tensors).

CI has no GPU, so the caches are CPU tensors, but everything that decides the layout is
vLLM's own code: the per-layer views come from ``create_kv_cache_views`` for each
``KVCacheLayout`` (physical permutations, layer- or block-outermost, kernel-block splitting),
and keys/values are written by the real ``FlashAttentionImpl`` / ``TritonAttentionImpl``
``do_kv_cache_update``, which choose how K and V sit in the view.  Only their device scatter
kernel (``reshape_and_cache_flash``, CUDA / Triton, absent from a CPU install) is replaced by
its documented semantics: token ``t`` goes to ``key_cache[slot // N, slot % N]``, with
``key_cache [blocks, N, heads, head_size]``.  FlashInfer's module needs the ``flashinfer``
package and is not imported; it splits the same view the same way (``transpose(1, 2).split``).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends import flash_attn, triton_attn
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheGroupSpec,
    KVCacheTensor,
    compute_layout_strides,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from vllm_twotower.engine.context_reader import ContextReader, paged_layer_kv
from vllm_twotower.ops.paged_attention import gather_paged

HEADS, HEAD_SIZE, NUM_BLOCKS = 2, 8, 12
LAYERS = ["model.layers.1.mixer.attn", "model.layers.3.mixer.attn"]
# Batch rows 0..4; rows 3, 0, 4, 1 are read: 37 tokens (partial last block), 32 (exact
# multiple of both block sizes used), 1 token, 16.
BATCH_LENGTHS = [32, 16, 5, 37, 1]
READ_ROWS = torch.tensor([3, 0, 4, 1])

# name: (module, backend, impl, the module's device scatter kernel)
BACKENDS = {
    "FLASH_ATTN": (
        flash_attn,
        flash_attn.FlashAttentionBackend,
        flash_attn.FlashAttentionImpl,
        "reshape_and_cache_flash",
    ),
    "TRITON_ATTN": (
        triton_attn,
        triton_attn.TritonAttentionBackend,
        triton_attn.TritonAttentionImpl,
        "triton_reshape_and_cache_flash",
    ),
}


def _scatter(key, value, key_cache, value_cache, slot_mapping, *args) -> None:
    """``reshape_and_cache_flash`` semantics (csrc/cache_kernels.cu), on CPU tensors."""
    block_size = key_cache.shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    key_cache[blocks, offsets] = key[: len(slot_mapping)]
    value_cache[blocks, offsets] = value[: len(slot_mapping)]


def _impl_state() -> SimpleNamespace:
    """The attributes of a dense, unquantized decoder impl that ``do_kv_cache_update`` reads."""
    return SimpleNamespace(
        attn_type=AttentionType.DECODER,
        head_size=HEAD_SIZE,
        kv_cache_dtype="auto",
        _is_per_token_head_quant=False,
    )


def _views(
    spec: FullAttentionSpec, layout: KVCacheLayout, kernel_block_size: int | None
) -> list[torch.Tensor]:
    """The layers' cache views, as ``allocate_kv_cache`` builds them for ``layout``."""
    strides = compute_layout_strides(spec, NUM_BLOCKS, len(LAYERS), layout)
    size = len(LAYERS) * NUM_BLOCKS * spec.page_size_bytes
    tensor = KVCacheTensor(
        size=size, layers=LAYERS, layer_stride=strides[0], block_stride=strides[1]
    )
    raw = torch.zeros(size, dtype=torch.int8)
    return create_kv_cache_views(
        raw, spec, NUM_BLOCKS, layout, tensor, kernel_block_size=kernel_block_size
    )


def _random_block_table(block_size: int, gen: torch.Generator) -> torch.Tensor:
    """Each row's blocks drawn without replacement from blocks 1..; unused entries stay 0, as
    in vLLM's block tables."""
    widths = [-(-n // block_size) for n in BATCH_LENGTHS]
    ids = torch.randperm(NUM_BLOCKS - 1, generator=gen) + 1
    table = torch.zeros(len(BATCH_LENGTHS), max(widths) + 1, dtype=torch.int32)
    start = 0
    for row, width in enumerate(widths):
        table[row, :width] = ids[start : start + width]
        start += width
    return table


def _fake_runner(
    spec: FullAttentionSpec, layers: dict[str, object], table: torch.Tensor
) -> SimpleNamespace:
    """What :class:`ContextReader` reads of vLLM's GPU model runner."""
    return SimpleNamespace(
        compilation_config=SimpleNamespace(static_forward_context=layers),
        kv_cache_config=SimpleNamespace(
            kv_cache_groups=[KVCacheGroupSpec(layer_names=list(layers), kv_cache_spec=spec)]
        ),
        input_batch=SimpleNamespace(
            block_table=[SimpleNamespace(block_table=SimpleNamespace(cpu=table))],
            num_reqs=table.shape[0],
        ),
        optimistic_seq_lens_cpu=torch.tensor(BATCH_LENGTHS),
        device=torch.device("cpu"),
    )


def _write_and_read(
    backend: str,
    layout: KVCacheLayout,
    dtype: torch.dtype,
    block_size: int,
    kernel_block_size: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module, backend_cls, impl_cls, writer = BACKENDS[backend]
    monkeypatch.setattr(module, writer, _scatter, raising=False)
    spec = backend_cls.customize_spec(
        FullAttentionSpec(
            block_size=block_size, num_kv_heads=HEADS, head_size=HEAD_SIZE, dtype=dtype
        )
    )
    gen = torch.Generator().manual_seed(0)
    views = _views(spec, layout, kernel_block_size)
    table = _random_block_table(block_size, gen)
    layers, written = {}, {}
    for name, view in zip(LAYERS, views, strict=True):
        layer = SimpleNamespace(
            kv_cache=view, attn_backend=backend_cls, _k_scale=None, _v_scale=None
        )
        layers[name] = layer
        for row, n in enumerate(BATCH_LENGTHS):
            k = torch.randn(n, HEADS, HEAD_SIZE, generator=gen).to(dtype)
            v = torch.randn(n, HEADS, HEAD_SIZE, generator=gen).to(dtype)
            pos = torch.arange(n)
            slots = table[row, pos // block_size].long() * block_size + pos % block_size
            impl_cls.do_kv_cache_update(_impl_state(), layer, k, v, view, slots)
            written[name, row] = (k, v)

    kv_lens = torch.tensor(BATCH_LENGTHS)[READ_ROWS]
    context = ContextReader(_fake_runner(spec, layers, table)).read(READ_ROWS, kv_lens)

    assert sorted(context.kv) == [1, 3]
    assert torch.equal(context.kv_lens, kv_lens)
    for name in LAYERS:
        keys, values = gather_paged(context.kv[int(name.split(".")[2])], context.kv_lens)
        assert keys.shape == values.shape == (len(READ_ROWS), max(BATCH_LENGTHS), HEADS, HEAD_SIZE)
        assert keys.dtype == values.dtype == dtype
        for i, row in enumerate(READ_ROWS.tolist()):
            k, v = written[name, row]
            assert torch.equal(keys[i, : len(k)], k)
            assert torch.equal(values[i, : len(v)], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", list(KVCacheLayout), ids=lambda layout: layout.name)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_reads_back_what_the_backend_wrote(
    backend: str, layout: KVCacheLayout, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every physical permutation vLLM can bind, layer- and block-outermost."""
    _write_and_read(backend, layout, dtype, 16, None, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "layout", [KVCacheLayout.LBHNC, KVCacheLayout.LBNHC], ids=lambda layout: layout.name
)
def test_kernel_blocks_smaller_than_manager_blocks(
    layout: KVCacheLayout, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """32-token manager blocks bound as 8-token kernel blocks (as for FlashInfer's fixed
    page sizes); the block table and slot mapping stay in manager blocks."""
    _write_and_read("FLASH_ATTN", layout, dtype, 32, 8, monkeypatch)


def test_packed_spec_is_refused() -> None:
    """A backend that packs K and V as separate head slots (B12X, ROCm) says so in its spec."""
    spec = FullAttentionSpec(
        block_size=16, num_kv_heads=HEADS, head_size=HEAD_SIZE, dtype=torch.bfloat16
    )
    packed = replace(spec, num_head_slots=2, state_content_bytes=HEADS * HEAD_SIZE * 2)
    cache = torch.zeros(NUM_BLOCKS, 2, 16, HEADS * HEAD_SIZE, dtype=torch.bfloat16)
    layer = SimpleNamespace(kv_cache=cache, attn_backend=flash_attn.FlashAttentionBackend)
    table = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match=r"FLASH_ATTN cache of shape \(12, 2, 16, 16\)"):
        paged_layer_kv(layer, table, packed)


def test_unknown_shape_is_refused() -> None:
    """A dense spec but a cache that is not vLLM's ``[B, H, N, K|V]`` view (here the older
    ``(2, blocks, block_size, heads, head_size)`` layout) is refused, not misread."""
    spec = FullAttentionSpec(
        block_size=16, num_kv_heads=HEADS, head_size=HEAD_SIZE, dtype=torch.float32
    )
    cache = torch.zeros(2, NUM_BLOCKS, 16, HEADS, HEAD_SIZE)
    layer = SimpleNamespace(kv_cache=cache, attn_backend=triton_attn.TritonAttentionBackend)
    table = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(
        NotImplementedError, match=r"TRITON_ATTN cache of shape \(2, 12, 16, 2, 8\)"
    ):
        paged_layer_kv(layer, table, spec)

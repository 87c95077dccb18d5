"""The paged joint-attention op against the reference ``attend`` on the keys that were written.

A synthetic paged cache is filled, one token at a time, through a block table and a scrambled
block interior (an arbitrary permutation of each block's K and V cells, inside a strided view
of a larger tensor); the reference then attends over the keys as they were given, unpadded, one
row at a time.  The torch fallback (gather + ``attend``) and the compiled kernel must both agree
with it: the fallback bit for bit with ``attend`` over its own padded batch, the kernel within
float32 rounding (its online softmax sums in another order).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_twotower.ops import DISABLE_ENV, extension_available, extension_status, has_kernel
from vllm_twotower.ops.paged_attention import (
    PagedKV,
    gather_paged,
    paged_block_attention,
)
from vllm_twotower.reference.attention import attend

needs_kernel = pytest.mark.skipif(
    not extension_available(), reason=f"compiled ops unavailable: {extension_status()}"
)


def make_case(
    seed: int,
    kv_lens: list[int],
    block_lens: list[int],
    *,
    size: int = 4,
    heads: tuple[int, int] = (2, 1),
    head_dim: int = 8,
    block_size: int = 8,
    dtype: torch.dtype = torch.float32,
    interior: str = "scrambled",
) -> dict:
    """Queries, block keys/values, a written paged context and the context as written;
    ``heads`` = (query heads, kv heads).  ``interior`` places a block's K and V cells:
    ``scrambled`` (a random permutation), ``rows`` (token-major, as dense ``[N, K|V]`` views) or
    ``columns`` (keys channel-major, values token-major, as vLLM's CPU backend); the kernel
    stages each differently."""
    q_heads, kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    rows = len(kv_lens)
    used = [-(-n // block_size) for n in kv_lens]
    num_blocks = sum(used) + 2
    width = max(max(used), 1) + 1
    # A strided view: the cache is a slice of a larger tensor on both the head and channel axes.
    big = torch.randn(num_blocks, kv_heads + 1, block_size, 2 * head_dim + 3, generator=gen)
    cache = big.to(dtype)[:, 1:, :, 3:]
    cells = block_size * 2 * head_dim
    perm = torch.randperm(cells, generator=gen)
    if interior == "rows":
        perm = torch.arange(cells)
    elif interior == "columns":
        t, c = torch.arange(block_size)[:, None], torch.arange(head_dim)[None, :]
        perm = torch.stack([c * block_size + t, block_size * head_dim + t * head_dim + c])
        perm = perm.flatten()
    token, channel = perm // (2 * head_dim), perm % (2 * head_dim)
    offsets = (token * cache.stride(2) + channel * cache.stride(3)).view(2, block_size, head_dim)
    table = torch.zeros(rows, width, dtype=torch.long)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    context = []
    flat = cache.as_strided((big.numel() - cache.storage_offset(),), (1,))
    for r, n in enumerate(kv_lens):
        for j in range(used[r]):
            table[r, j] = free.pop()
        k = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        for p in range(n):
            for h in range(kv_heads):
                base = int(table[r, p // block_size]) * cache.stride(0) + h * cache.stride(1)
                flat[base + offsets[0, p % block_size]] = k[p, h]
                flat[base + offsets[1, p % block_size]] = v[p, h]
        context.append((k, v))

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(rows, size, heads, head_dim, generator=gen).to(dtype)

    return {
        "q": rand(q_heads),
        "k": rand(kv_heads),
        "v": rand(kv_heads),
        "paged": PagedKV(cache, table, offsets[0], offsets[1]),
        "kv_lens": torch.tensor(kv_lens),
        "block_lens": torch.tensor(block_lens),
        "context": context,
        "scale": head_dim**-0.5,
    }


def reference_rows(case: dict, causal: bool) -> list[torch.Tensor]:
    """``attend`` row by row over the context as written plus the row's real block."""
    out = []
    for r, (ctx_k, ctx_v) in enumerate(case["context"]):
        n = int(case["block_lens"][r])
        keys = torch.cat([ctx_k, case["k"][r, :n]])
        values = torch.cat([ctx_v, case["v"][r, :n]])
        q = case["q"][r, :n]
        out.append(attend(q, keys, values, causal=causal, scale=case["scale"]))
    return out


def run(case: dict, causal: bool, use_kernel: bool) -> torch.Tensor:
    return paged_block_attention(
        case["q"],
        case["k"],
        case["v"],
        case["paged"],
        case["kv_lens"],
        case["block_lens"],
        scale=case["scale"],
        causal=causal,
        use_kernel=use_kernel,
    )


def check(case: dict, causal: bool, dtype: torch.dtype) -> None:
    fallback = run(case, causal, use_kernel=False)
    kernel = run(case, causal, use_kernel=True) if extension_available() else None
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 0}
    for r, expected in enumerate(reference_rows(case, causal)):
        n = expected.shape[0]
        torch.testing.assert_close(fallback[r, :n], expected, **tol)
        if kernel is not None:
            assert kernel.dtype == dtype and kernel.shape == case["q"].shape
            torch.testing.assert_close(kernel[r, :n], expected, **tol)


def test_gather_reads_what_was_written() -> None:
    case = make_case(0, [37, 0, 16], [4, 4, 4], heads=(4, 2), block_size=16)
    keys, values = gather_paged(case["paged"], case["kv_lens"])
    assert keys.shape == values.shape == (3, 37, 2, 8)
    for r, (k, v) in enumerate(case["context"]):
        assert torch.equal(keys[r, : len(k)], k)
        assert torch.equal(values[r, : len(v)], v)


def test_fallback_is_attend_over_the_padded_gather() -> None:
    """The fallback is the reference ``attend`` over one padded, masked batch, bit for bit."""
    case = make_case(1, [5, 40], [3, 6], size=6, head_dim=16)
    out = run(case, causal=False, use_kernel=False)
    keys, values = gather_paged(case["paged"], case["kv_lens"])
    mask = torch.zeros(2, 40 + 6, dtype=torch.bool)
    mask[0, :5] = mask[1, :40] = True
    mask[0, 40:43] = mask[1, 40:46] = True
    expected = attend(
        case["q"],
        torch.cat([keys, case["k"]], 1),
        torch.cat([values, case["v"]], 1),
        causal=False,
        scale=case["scale"],
        key_mask=mask,
    )
    assert torch.equal(out, expected)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    size=st.integers(1, 17),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([4, 8, 32, 40]),
    block_size=st.sampled_from([1, 8, 16]),
    causal=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    data=st.data(),
)
def test_kernel_and_fallback_match_the_reference(
    seed: int,
    size: int,
    kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    causal: bool,
    dtype: torch.dtype,
    data: st.DataObject,
) -> None:
    rows = data.draw(st.integers(1, 4))
    kv_lens = data.draw(st.lists(st.integers(0, 70), min_size=rows, max_size=rows))
    block_lens = data.draw(st.lists(st.integers(1, size), min_size=rows, max_size=rows))
    shape = {"size": size, "head_dim": head_dim, "block_size": block_size, "dtype": dtype}
    case = make_case(seed, kv_lens, block_lens, heads=(kv_heads * group, kv_heads), **shape)
    check(case, causal, dtype)


@pytest.mark.parametrize("interior", ["rows", "columns", "scrambled"])
@pytest.mark.parametrize("heads", [(32, 2), (3, 1)])
def test_long_contexts_span_many_tiles(interior: str, heads: tuple[int, int]) -> None:
    """Contexts of several kernel tiles (the online softmax across tiles) in each block interior
    the kernel stages differently, ragged lengths, and query counts (16 × 16 and 5 × 3) that
    fill the micro-kernel's 16 query lanes exactly and leave a remainder."""
    size = 16 if heads[0] == 32 else 5
    shape = {"size": size, "heads": heads, "head_dim": 32, "block_size": 16}
    case = make_case(4, [2500, 0, 1029], [size, 3, 1], interior=interior, **shape)
    for causal in (False, True):
        check(case, causal, torch.float32)


@needs_kernel
def test_kernel_is_used_unless_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    assert has_kernel("paged_block_attention", torch.device("cpu"))
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert not has_kernel("paged_block_attention", torch.device("cpu"))


@needs_kernel
def test_kernel_refuses_mismatched_inputs() -> None:
    case = make_case(2, [3], [2], size=2, block_size=4)
    paged = case["paged"]
    with pytest.raises(RuntimeError, match="index tensors must be contiguous int64"):
        torch.ops.twotower.paged_block_attention(
            case["q"],
            case["k"],
            case["v"],
            paged.cache,
            paged.block_table.int(),
            case["kv_lens"],
            case["block_lens"],
            paged.k_offsets,
            paged.v_offsets,
            case["scale"],
            False,
        )


@pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel("paged_block_attention", torch.device("cuda"))),
    reason="needs a GPU and the CUDA build of the extension",
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_the_reference(dtype: torch.dtype, causal: bool) -> None:
    shape = {"size": 16, "heads": (8, 2), "head_dim": 128, "block_size": 16, "dtype": dtype}
    case = make_case(3, [300, 0, 45, 17], [16, 16, 5, 1], **shape)
    paged = case["paged"]
    on_gpu = dict(case, paged=PagedKV(*(t.cuda() for t in vars(paged).values())))
    for name in ("q", "k", "v", "kv_lens", "block_lens"):
        on_gpu[name] = case[name].cuda()
    out = run(on_gpu, causal, use_kernel=True).cpu()
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 0}
    for r, expected in enumerate(reference_rows(case, causal)):
        torch.testing.assert_close(out[r, : expected.shape[0]], expected, **tol)

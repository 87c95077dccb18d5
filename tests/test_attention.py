"""Attention: causal context attention and the denoiser's joint (unmasked) attention."""

from __future__ import annotations

import math

import torch

from vllm_twotower.reference.attention import attend


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Per-query, per-head loop over the textbook formula."""
    length, heads, dim = q.shape
    past = k.shape[0] - length
    group = heads // k.shape[1]
    out = torch.zeros_like(q)
    for t in range(length):
        visible = past + t + 1 if causal else k.shape[0]
        for h in range(heads):
            kh, vh = k[:visible, h // group], v[:visible, h // group]
            weights = torch.softmax(kh @ q[t, h] / math.sqrt(dim), dim=0)
            out[t, h] = weights @ vh
    return out


def test_joint_attention_sees_all_context_and_all_block_positions() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 8, generator=g, dtype=torch.float64)
    k_ctx, v_ctx = torch.randn(2, 7, 2, 8, generator=g, dtype=torch.float64)
    k_blk, v_blk = torch.randn(2, 5, 2, 8, generator=g, dtype=torch.float64)
    k, v = torch.cat([k_ctx, k_blk]), torch.cat([v_ctx, v_blk])
    out = attend(q, k, v, causal=False, scale=8**-0.5)
    torch.testing.assert_close(out, _explicit(q, k, v, causal=False))
    # a later block position changes the output of an earlier one (bidirectional)
    k2 = k.clone()
    k2[-1] += 1
    assert not torch.allclose(attend(q, k2, v, causal=False, scale=8**-0.5)[0], out[0])


def test_causal_attention_over_cache() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 4, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 9, 2, 8, generator=g, dtype=torch.float64)
    out = attend(q, k, v, causal=True, scale=8**-0.5)
    torch.testing.assert_close(out, _explicit(q, k, v, causal=True))


def test_joint_attention_with_empty_context() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(3, 4, 2, 8, generator=g, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(
        attend(q, k, v, causal=False, scale=8**-0.5), _explicit(q, k, v, causal=False)
    )


def test_key_mask_makes_a_padded_batch_equal_each_row_alone() -> None:
    """The engine's batched pass: rows padded to one context length, padding masked out."""
    g = torch.Generator().manual_seed(3)
    lengths, block = [5, 0, 3], 4
    padded = max(lengths)
    q = torch.randn(len(lengths), block, 4, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, len(lengths), padded + block, 2, 8, generator=g, dtype=torch.float64)
    positions = torch.arange(padded + block)
    key_mask = (positions < torch.tensor(lengths)[:, None]) | (positions >= padded)
    for causal in (False, True):
        out = attend(q, k, v, causal=causal, scale=8**-0.5, key_mask=key_mask)
        for row, length in enumerate(lengths):
            keep = torch.cat([positions[:length], positions[padded:]])
            alone = _explicit(q[row], k[row, keep], v[row, keep], causal=causal)
            torch.testing.assert_close(out[row], alone)

"""Batched forward passes and losses of the two training stages, on the reference modules.

Nothing here re-implements the model: the towers are the reference
:class:`~vllm_twotower.reference.blocks.Backbone` modules (whose mixers accept leading batch
dimensions), and the per-row time conditioning is :meth:`TwoTowerModel.time_modulation` itself,
evaluated once per distinct mask count.  ``tests/test_train.py`` holds the batched denoiser pass
to :meth:`TwoTowerModel.denoise` on every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_twotower.data import MASK_ID
from vllm_twotower.reference.blocks import Backbone, ContextState
from vllm_twotower.reference.model import TwoTowerModel


def empty_batch_state(backbone: Backbone, batch: int) -> ContextState:
    """``batch`` copies of a tower's empty state (each cache tensor gains a leading dim)."""
    state = backbone.empty_state(backbone.norm_f.weight.device)
    caches = tuple(
        tuple(t.unsqueeze(0).expand(batch, *t.shape).contiguous() for t in cache)
        for cache in state.caches
    )
    return ContextState(0, caches)


def context_logits(model: TwoTowerModel, inputs: torch.Tensor) -> torch.Tensor:
    """AR logits ``[B, T, V]`` of the context tower on ``inputs [B, T]`` from an empty state."""
    state = empty_batch_state(model.context_tower, inputs.shape[0])
    hidden, _ = model.context_tower(inputs, state, causal=True)
    return model.context_lm_head(hidden).float()


def ar_loss(
    model: TwoTowerModel, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean next-token CE over weighted positions, per-row all-correct [B] bool)``.

    A row is all-correct when the argmax at every weighted position is its target: with the
    answer-only weights that is exactly "greedy AR decoding reproduces the answer and its EOS",
    so it is a cheap, batched stand-in for exact-match accuracy.
    """
    logits = context_logits(model, inputs)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    loss = (ce * weights).sum() / weights.sum()
    wrong = (logits.argmax(-1) != targets) & (weights > 0)
    return loss, ~wrong.any(dim=1)


def batch_modulation(model: TwoTowerModel, masked_counts: torch.Tensor) -> torch.Tensor:
    """Per-row adaLN parameters ``[L, 3, B, 1, H]`` for blocks with ``masked_counts [B]`` masks.

    ``t = count / S`` takes at most ``S + 1`` values, so each distinct one goes through
    :meth:`TwoTowerModel.time_modulation` (the inference code, with the same float ``t``), and
    rows index the results.  The layout makes ``shift, scale, gate = modulation[l]`` broadcast
    over a block's ``[B, S, H]`` activations inside the reference ``Block``.
    """
    size = model.config.chunk_size
    values, rows = torch.unique(masked_counts, return_inverse=True)
    table = torch.stack([model.time_modulation(int(v) / size) for v in values.tolist()])
    return table[rows].permute(1, 2, 0, 3).unsqueeze(3)  # [U, L, 3, H] -> [L, 3, B, 1, H]


def context_state(model: TwoTowerModel, prefixes: torch.Tensor) -> ContextState:
    """The (frozen) context tower's state after reading ``prefixes [B, P]``."""
    with torch.no_grad():
        state = empty_batch_state(model.context_tower, prefixes.shape[0])
        _, state = model.context_tower(prefixes, state, causal=True)
    return state


def denoiser_logits(
    model: TwoTowerModel, canvas: torch.Tensor, context: ContextState
) -> torch.Tensor:
    """Denoiser logits ``[B, S, V]`` (float32) for noisy blocks ``canvas [B, S]`` after ``context``.

    The batched form of :meth:`TwoTowerModel.denoise`: joint unmasked attention over the context
    KV of the same layer plus the block, Mamba seeded from the context states, and each row
    conditioned on its own ``t = #masked / S``.
    """
    modulation = batch_modulation(model, (canvas == MASK_ID).sum(dim=1))
    hidden, _ = model.denoiser_tower(canvas, context, causal=False, modulation=modulation)
    return model.lm_head(hidden).float()


def diffusion_loss(
    model: TwoTowerModel, prefixes: torch.Tensor, canvas: torch.Tensor, blocks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean CE over masked positions, per-position correct [N] bool over them)``.

    The target at block position ``i`` is the clean token at ``i`` (no shift).  The mask id's
    logit is excluded, as mask diffusion suppresses it before its softmax at inference.
    """
    logits = denoiser_logits(model, canvas, context_state(model, prefixes))
    logits = logits.index_fill(-1, torch.tensor([MASK_ID], device=logits.device), float("-inf"))
    masked = canvas == MASK_ID
    picked, targets = logits[masked], blocks[masked]
    return F.cross_entropy(picked, targets), picked.argmax(-1) == targets

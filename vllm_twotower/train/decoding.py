"""Validation by decoding: greedy mask diffusion on a whole batch, scored by exact match.

Stage 2's masked-token accuracy is measured under random masks, but what is served is the
commit rule's trajectory: the first pass sees a block of nothing but masks, later passes see
the positions the rule chose to commit.  A denoiser can improve on the first measure while its
confident mistakes along that trajectory do not go away, so stage 2 also logs the measure the
quality suite reports — exact match of greedily decoded answers at a confidence threshold γ,
and tokens committed per denoiser pass.

The decoding is the reference semantics in batched form: the batched denoiser pass of
:mod:`vllm_twotower.train.objectives` (equal to :meth:`TwoTowerModel.denoise` row by row) and
the reference's block loop over the project's one commit rule
(:func:`vllm_twotower.reference.generate.fill_blocks`).  Items are grouped by
prompt length, so no row carries padding; the context of each block is re-read from scratch
(the reference extends it from the cached state instead: the same computation up to float
rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_twotower.data import EOS_ID, MASK_ID
from vllm_twotower.params import MASK_DIFFUSION, TwoTowerParams
from vllm_twotower.reference.generate import fill_blocks
from vllm_twotower.reference.model import TwoTowerModel
from vllm_twotower.train.batching import Encoded
from vllm_twotower.train.objectives import context_state, denoiser_logits


@dataclass
class DecodeOutcome:
    """Per-item exact match (in the order given) and the committed-token / pass counts."""

    correct: list[bool]
    passes: int
    committed: int

    @property
    def tokens_per_pass(self) -> float:
        return self.committed / max(1, self.passes)


def _decode_group(
    model: TwoTowerModel, prompts: torch.Tensor, params: TwoTowerParams, max_new_tokens: int
) -> tuple[torch.Tensor, int, int]:
    """Decode prompts of equal length ``[B, P]``: ``(generated ids [B, n·S], passes, committed)``.

    Passes and committed tokens count only rows that had not yet produced EOS, as a server
    stops a request once a block contains it.
    """
    rows, size = prompts.shape[0], params.block_size
    device = prompts.device
    sequence, finished = prompts, torch.zeros(rows, dtype=torch.bool, device=device)
    passes = committed = 0
    for _ in range(math.ceil(max_new_tokens / size)):
        context = context_state(model, sequence)
        canvas, per_pass, _ = fill_blocks(
            lambda canvas, context=context: denoiser_logits(model, canvas, context),
            rows,
            params,
            mask_id=MASK_ID,
            block_start=sequence.shape[1],
            device=device,
        )
        for decided in per_pass:
            live = ~finished & (decided > 0)
            passes += int(live.sum())
            committed += int(decided[live].sum())
        sequence = torch.cat([sequence, canvas], dim=1)
        finished |= (canvas == EOS_ID).any(dim=1)
        if bool(finished.all()):
            break
    return sequence[:, prompts.shape[1] :], passes, committed


@torch.no_grad()
def decode_exact_match(
    model: TwoTowerModel,
    items: Sequence[Encoded],
    params: TwoTowerParams,
    *,
    max_new_tokens: int = 32,
    batch: int = 128,
) -> DecodeOutcome:
    """Greedy mask diffusion on every item's prompt; correct = answer and ``<eos>`` reproduced.

    ``params`` are a request's (γ, S, T; its mode must be mask diffusion), ``max_new_tokens``
    the generation budget, as in the quality suite.
    """
    if params.mode != MASK_DIFFUSION:
        raise ValueError(f"decode_exact_match decodes mask diffusion, not {params.mode!r}")
    device = model.device
    by_length: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        by_length.setdefault(item.answer_start, []).append(index)
    correct = [False] * len(items)
    outcome = DecodeOutcome(correct, 0, 0)
    for length, indices in sorted(by_length.items()):
        for i in range(0, len(indices), batch):
            chunk = indices[i : i + batch]
            prompts = torch.tensor([items[j].ids[:length] for j in chunk], device=device)
            generated, passes, committed = _decode_group(model, prompts, params, max_new_tokens)
            outcome.passes += passes
            outcome.committed += committed
            for row, j in enumerate(chunk):
                answer = items[j].ids[length:]
                correct[j] = generated[row, : len(answer)].tolist() == list(answer)
    return outcome

"""Allowed ids, bad words, logit bias and presence / frequency / repetition penalties, as in vLLM.

The one home of how a request's ``logit_bias`` and penalties change the logits its tokens are
chosen from, shared by the reference and the engine, in every mode: the context tower's logits
in ``ar``, the denoiser's in ``mock_ar`` and ``mask_diffusion``.  The adjusted logits are what
the commit rule (:mod:`vllm_twotower.commit`) then tempers, filters, draws from and ranks by;
output logprobs stay those of the unadjusted logits (vLLM's default ``raw_logprobs``).

vLLM's order and definitions (``vllm/v1/sample/sampler.py: apply_logits_processors``, in
float32): ids outside a request's ``allowed_token_ids`` are set to ``-inf``
(``allowed_token_ids_mask``), and so is the last id of each of its ``bad_words`` whose other
ids end the output (``vllm/v1/sample/ops/bad_words.py``: the output only, not the prompt; a
one-token word always), and so are its stop ids (EOS and ``stop_token_ids``) while its
output is shorter than ``min_tokens`` (``MinTokensLogitsProcessor``); the bias is added
(``LogitBiasLogitsProcessor``), then
``vllm/model_executor/layers/utils.py: apply_penalties``:

* repetition: a token seen in the prompt or the output has its logit multiplied by
  ``1 / repetition_penalty`` if positive, else by ``repetition_penalty``;
* frequency: ``- frequency_penalty * (times the token occurs in the output)``;
* presence: ``- presence_penalty * (1 if the token occurs in the output)``.

**What counts as the output** is the request's tokens committed before the token (AR, mock-AR)
or the block (mask diffusion) being chosen: inside a block the history is fixed, positions
decided in earlier passes of the same block do not count.  That is the request's token list as
both the reference and vLLM's input batch hold it when the block starts, so the two compute the
same adjustment from the same data, once per block instead of once per pass, and in AR and
mock-AR (one token per step) it is exactly vLLM's definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitAdjuster:
    """The allowed ids, bias and penalties of ``R`` rows with their histories, to apply."""

    bias: torch.Tensor  # [R, V] float32
    presence: torch.Tensor  # [R] float32, 0 = off
    frequency: torch.Tensor  # [R] float32, 0 = off
    repetition: torch.Tensor  # [R] float32, 1 = off
    seen: torch.Tensor  # [R, V] bool: in the prompt or the output
    output_counts: torch.Tensor  # [R, V] float32: occurrences in the output
    #: [R, V] bool: ids the row may choose (allowed_token_ids, less bad words' last ids that
    #: the output calls for and stop ids under min_tokens)
    allowed: torch.Tensor

    @classmethod
    def build(
        cls,
        vocab_size: int,
        *,
        prompts: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor],
        presence: torch.Tensor,
        frequency: torch.Tensor,
        repetition: torch.Tensor,
        bias_ids: torch.Tensor,
        bias_values: torch.Tensor,
        allowed_ids: torch.Tensor,
        min_tokens: torch.Tensor,
        stop_ids: torch.Tensor,
        bad_words: torch.Tensor | None = None,
    ) -> LogitAdjuster:
        """Adjuster of rows whose prompt and output token ids are ``prompts[r]`` /
        ``outputs[r]``; ``bias_ids [R, W]`` (``-1``: unused) and ``bias_values [R, W]`` hold
        each row's ``logit_bias`` entries, ``allowed_ids [R, A]`` (``-1``: unused) its
        ``allowed_token_ids`` (none: every id allowed); ``min_tokens [R]`` and
        ``stop_ids [R, T]`` (``-1``: unused) ban the stop ids while an output is shorter;
        ``bad_words [R, W, L]`` holds each row's bad words (:func:`pad_bad_words`)."""
        rows = len(prompts)
        output_counts = _counts(outputs, vocab_size)
        seen = (_counts(prompts, vocab_size) > 0) | (output_counts > 0)
        bias = torch.zeros(rows, vocab_size + 1)
        used = bias_ids >= 0
        bias.scatter_add_(1, torch.where(used, bias_ids, vocab_size), bias_values.float() * used)
        listed = allowed_ids >= 0
        allowed = torch.zeros(rows, vocab_size + 1, dtype=torch.bool)
        allowed.scatter_(1, torch.where(listed, allowed_ids, vocab_size), True)
        allowed[~listed.any(-1)] = True
        short = torch.tensor([len(o) for o in outputs], dtype=torch.int64) < min_tokens
        banned = (stop_ids >= 0) & short[:, None]
        allowed.scatter_(1, torch.where(banned, stop_ids, vocab_size), False)
        if bad_words is not None:
            ends = bad_words[..., -1]
            banned = _bad_word_matches(bad_words, outputs)
            allowed.scatter_(1, torch.where(banned, ends, vocab_size).flatten(1), False)
        return cls(
            bias[:, :vocab_size],
            presence.float(),
            frequency.float(),
            repetition.float(),
            seen,
            output_counts,
            allowed[:, :vocab_size],
        )

    def to(self, device: torch.device | str) -> LogitAdjuster:
        return LogitAdjuster(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def select(self, index: torch.Tensor) -> LogitAdjuster:
        """The adjuster of rows ``index``."""
        return LogitAdjuster(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Float32 adjusted copy of ``logits [R, ..., V]`` (one history per row ``R``)."""
        logits = logits.float()
        extra = (1,) * (logits.dim() - 2)

        def per_row(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], *extra, *t.shape[1:])

        logits = logits.masked_fill(~per_row(self.allowed), float("-inf"))
        logits = logits + per_row(self.bias)
        penalties = torch.where(per_row(self.seen), per_row(self.repetition[:, None]), 1.0)
        logits = logits * torch.where(logits > 0, 1.0 / penalties, penalties)
        logits = logits - per_row(self.frequency[:, None] * self.output_counts)
        return logits - per_row(self.presence[:, None] * (self.output_counts > 0))


def _counts(histories: Sequence[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """``[R, V]`` float32 occurrences of each token id in each row's history."""
    counts = torch.zeros(len(histories), vocab_size)
    for r, ids in enumerate(histories):
        ids = ids.long().cpu()
        counts[r].scatter_add_(0, ids, torch.ones(ids.numel()))
    return counts


def pad_bad_words(words: Sequence[Sequence[int]], count: int, length: int) -> torch.Tensor:
    """``[count, length]`` int64: each bad word's token ids right-aligned, ``-1`` before them and
    in rows past ``len(words)`` (a word whose last id is ``-1`` is unused)."""
    out = torch.full((count, length), -1, dtype=torch.int64)
    for w, ids in enumerate(words):
        if ids:
            out[w, length - len(ids) :] = torch.tensor(list(ids), dtype=torch.int64)
    return out


def _bad_word_matches(bad_words: torch.Tensor, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Bool ``[R, W]``: the bad words whose ids before the last end row ``r``'s output.

    vLLM's ``_apply_bad_words_single_batch``: a word of ``n`` ids bans its last id when the
    output's last ``n - 1`` ids are its first ``n - 1`` (a word longer than the output plus one
    never does).  The output's tail is left-padded with ``-2``, which no id equals, and the
    words' ``-1`` padding matches anything.
    """
    rows, _, length = bad_words.shape
    tails = torch.full((rows, length - 1), -2, dtype=torch.int64)
    for r, ids in enumerate(outputs):
        tail = ids.long().cpu()[max(0, ids.numel() - (length - 1)) :]
        if tail.numel():
            tails[r, length - 1 - tail.numel() :] = tail
    prefix = bad_words[..., :-1]
    matches = ((prefix == -1) | (prefix == tails[:, None, :])).all(-1)
    return matches & (bad_words[..., -1] >= 0)


def adjustments_active(
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
    bias_ids: torch.Tensor,
    allowed_ids: torch.Tensor,
    min_tokens: torch.Tensor,
    bad_words: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool ``[R]``: rows whose allowed ids, bad words, min_tokens, bias or penalties may
    change anything."""
    listed = (bias_ids >= 0).any(-1) | (allowed_ids >= 0).any(-1) | (min_tokens > 0)
    if bad_words is not None:
        listed |= (bad_words[..., -1] >= 0).any(-1)
    return (presence != 0) | (frequency != 0) | (repetition != 1) | listed

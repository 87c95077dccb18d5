"""Training batches for both stages, built so that training sees what inference sees.

* **Stage 1 (AR)** batches are random mixes of all families, right-padded with ``<pad>``: the
  context tower is causal, so padding after a sequence's ``<eos>`` cannot change any earlier
  position, and the loss simply ignores it.
* **Stage 2 (diffusion)** items are ``(prefix, clean block)`` pairs.  The prefix is what the
  context tower has read before the block — the prompt (``<bos>`` included) plus the clean
  answer blocks before it — and the block is the next 16 answer tokens.  At inference the first
  diffusion block starts right after the prompt, which is *not* 16-aligned, so training blocks
  start at the answer start too; the answer and its ``<eos>`` are padded with ``<eos>`` up to a
  whole block, because a served block is always denoised in full and the model must fill the
  positions after the answer (they are cut at the first EOS).  Items are bucketed by prefix
  length so that a batch needs no padding at all: the context state a batch row is denoised
  against is then exactly the one inference builds (no pad tokens in the KV cache or in the
  Mamba scan).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from vllm_twotower.data import EOS_ID, MASK_ID, PAD_ID, Example, encode_example


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ``<bos> prompt answer <eos>`` and where the answer starts."""

    ids: tuple[int, ...]
    answer_start: int


def encode_all(tokenizer: Tokenizer, examples: Sequence[Example]) -> list[Encoded]:
    """Tokenize examples for training (see :func:`vllm_twotower.data.encode_example`)."""
    out = []
    for example in examples:
        ids, start = encode_example(tokenizer, example)
        out.append(Encoded(tuple(ids), start))
    return out


# ----------------------------------------------------------------------------- stage 1


@dataclass(frozen=True)
class ARBatch:
    """``inputs``, ``targets`` (next tokens) and ``weights`` (0/1 loss mask), all ``[B, T]``."""

    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor

    def to(self, device: torch.device | str) -> ARBatch:
        return ARBatch(self.inputs.to(device), self.targets.to(device), self.weights.to(device))


def ar_batch(items: Sequence[Encoded], *, answer_only: bool = True) -> ARBatch:
    """Right-padded next-token batch; the loss covers the answer and ``<eos>`` (or everything).

    Why answer-only by default: prompts are uniformly random payloads (letters, digits), so
    predicting them teaches nothing the tasks need and would spend most of a tiny model's
    capacity and gradient on irreducible noise; the answer is what is served and measured.
    """
    length = max(len(item.ids) for item in items) - 1
    inputs = torch.full((len(items), length), PAD_ID, dtype=torch.long)
    targets = torch.full((len(items), length), PAD_ID, dtype=torch.long)
    weights = torch.zeros(len(items), length)
    for row, item in enumerate(items):
        ids = torch.tensor(item.ids)
        n = len(ids) - 1
        inputs[row, :n], targets[row, :n] = ids[:-1], ids[1:]
        first = item.answer_start - 1 if answer_only else 0  # input position predicting it
        weights[row, first:n] = 1.0
    return ARBatch(inputs, targets, weights)


def ar_batches(
    items: Sequence[Encoded],
    batch_size: int,
    generator: torch.Generator,
    *,
    answer_only: bool = True,
    pool: int = 8,
) -> Iterator[ARBatch]:
    """Endless random AR batches with little padding.

    Why pools: padding every batch to its longest sequence roughly doubles the tokens a step
    computes (lengths run from 6 to 44), yet batches of a single length would each hold one or
    two families and make the gradient lurch between tasks.  So ``pool`` batches' worth of random
    items are drawn at once, sorted by length and cut into batches (served in random order):
    batches stay family-mixed while padding shrinks to a few tokens.
    """
    while True:
        picks = torch.randint(len(items), (pool * batch_size,), generator=generator).tolist()
        picks.sort(key=lambda i: len(items[i].ids))
        for chunk in torch.randperm(pool, generator=generator).tolist():
            chosen = picks[chunk * batch_size : (chunk + 1) * batch_size]
            yield ar_batch([items[i] for i in chosen], answer_only=answer_only)


# ----------------------------------------------------------------------------- stage 2


@dataclass(frozen=True)
class BlockItem:
    """A diffusion training item: the context tower's input and the clean block after it."""

    prefix: tuple[int, ...]
    block: tuple[int, ...]


def block_items(items: Sequence[Encoded], block_size: int) -> list[BlockItem]:
    """Split each answer (with ``<eos>``, ``<eos>``-padded) into blocks starting at the answer.

    Block ``n`` of an example gets the prompt plus clean answer blocks ``0..n-1`` as its prefix.
    """
    out = []
    for item in items:
        answer = list(item.ids[item.answer_start :])
        answer += [EOS_ID] * ((-len(answer)) % block_size)
        for start in range(0, len(answer), block_size):
            prefix = item.ids[: item.answer_start] + tuple(answer[:start])
            out.append(BlockItem(prefix, tuple(answer[start : start + block_size])))
    return out


class PrefixBuckets:
    """Diffusion items grouped by prefix length, drawn as equal-length batches.

    A batch is one bucket, chosen with probability proportional to its size, and ``batch_size``
    items drawn from it with replacement — so over many steps every item is equally likely,
    whatever its bucket.
    """

    def __init__(self, items: Sequence[BlockItem]) -> None:
        buckets: dict[int, list[BlockItem]] = {}
        for item in items:
            buckets.setdefault(len(item.prefix), []).append(item)
        self.lengths = sorted(buckets)
        self.buckets = [buckets[n] for n in self.lengths]
        self.sizes = torch.tensor([len(b) for b in self.buckets], dtype=torch.float64)

    def sample(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prefixes [B, P], clean blocks [B, S])`` of one bucket."""
        bucket = self.buckets[int(torch.multinomial(self.sizes, 1, generator=generator))]
        picks = torch.randint(len(bucket), (batch_size,), generator=generator).tolist()
        prefixes = torch.tensor([bucket[i].prefix for i in picks], dtype=torch.long)
        blocks = torch.tensor([bucket[i].block for i in picks], dtype=torch.long)
        return prefixes, blocks

    def iter_all(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every item once, bucket by bucket (for validation)."""
        for bucket in self.buckets:
            for i in range(0, len(bucket), batch_size):
                chunk = bucket[i : i + batch_size]
                yield (
                    torch.tensor([it.prefix for it in chunk], dtype=torch.long),
                    torch.tensor([it.block for it in chunk], dtype=torch.long),
                )


def add_noise(
    blocks: torch.Tensor, generator: torch.Generator, t_min: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """MDLM forward process on clean blocks ``[B, S]``: ``(noisy canvas, masked [B, S] bool)``.

    Per row ``t ~ U[t_min, 1]`` and every position is masked with probability ``t``.  A row that
    drew no mask gets one random position masked (it would carry no loss otherwise).  The time
    the denoiser is conditioned on is the row's *actual* masked fraction, as at inference.
    """
    rows, size = blocks.shape
    t = t_min + (1 - t_min) * torch.rand(rows, 1, generator=generator)
    masked = torch.rand(rows, size, generator=generator) < t
    forced = torch.randint(size, (rows,), generator=generator)
    empty = ~masked.any(dim=1)
    masked[empty, forced[empty]] = True
    return blocks.masked_fill(masked, MASK_ID), masked

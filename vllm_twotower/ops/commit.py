"""The compiled commit kernel ``torch.ops.twotower.commit_step`` and when it may be used.

:func:`vllm_twotower.commit.commit_step` is the one entry point of the commit rule; it calls
:func:`commit_step_kernel` when :func:`commit_kernel_supports` its inputs and falls back to the
torch implementation otherwise.  ``TWOTOWER_DISABLE_KERNELS=1`` (read on every call, so tests and
benchmarks can flip it) sends every op of this package to its torch fallback.
"""

from __future__ import annotations

import torch

from vllm_twotower.ops import extension_available, has_kernel

_LOGIT_DTYPES = (torch.float32, torch.bfloat16)


def commit_kernel_supports(logits: torch.Tensor, canvas: torch.Tensor, mask_id: int) -> bool:
    """Whether :func:`commit_step_kernel` can run these inputs (else use the torch path)."""
    return (
        logits.dim() == 3
        and logits.dtype in _LOGIT_DTYPES
        and canvas.device == logits.device
        and 0 <= mask_id < logits.shape[-1]
        and has_kernel("commit_step", logits.device)
    )


def commit_step_kernel(
    logits: torch.Tensor,
    canvas: torch.Tensor,
    *,
    mask_id: int,
    threshold: torch.Tensor,
    step: torch.Tensor,
    steps_per_block: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    block_start: torch.Tensor,
    cutoff: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(canvas, num_committed, confidence)`` from the compiled kernel; arguments as the rule's.

    ``cutoff`` is ``[B, S]`` float64 :func:`vllm_twotower.commit.sampling_cutoff`: a sampling
    position draws only among tokens whose tempered logit is ``>=`` it (``-inf``: all).
    """
    return torch.ops.twotower.commit_step(
        logits,
        canvas,
        mask_id,
        threshold,
        step,
        steps_per_block,
        temperature,
        seed,
        block_start,
        cutoff,
    )


def _register_fake() -> None:
    """Shape-only implementation so ``torch.compile`` / fake tensors can trace through the op."""

    @torch.library.register_fake("twotower::commit_step")
    def _fake(
        logits: torch.Tensor,
        canvas: torch.Tensor,
        mask_id: int,
        threshold: torch.Tensor,
        step: torch.Tensor,
        steps_per_block: torch.Tensor,
        temperature: torch.Tensor,
        seed: torch.Tensor,
        block_start: torch.Tensor,
        cutoff: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, positions = canvas.shape
        return (
            canvas.new_empty((batch, positions), dtype=torch.int64),
            canvas.new_empty((batch,), dtype=torch.int64),
            logits.new_empty((batch, positions), dtype=torch.float32),
        )


if extension_available():
    _register_fake()

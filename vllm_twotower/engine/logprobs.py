"""Output logprobs of the tokens a block step emits, in vLLM's layout.

Each emitted token is reported with its log-probability under the distribution it was
committed from (:func:`vllm_twotower.commit.token_logprobs`: the context tower's for ``ar``,
the denoiser's pass that decided it for ``mask_diffusion`` and ``mock_ar``), the step's top
``k`` alternatives and its rank, exactly as vLLM's sampler reports them
(``vllm_internals.gather_logprobs``).  The reference records the same values
(``GenerationResult.logprobs``), which is what the tests hold the engine to.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_twotower import vllm_internals as vi
from vllm_twotower.commit import token_logprobs


class StepLogprobs:
    """Logprobs of one step's ``[num_reqs, width]`` emitted tokens, filled mode by mode."""

    def __init__(self, num_reqs: int, width: int, num_logprobs: int) -> None:
        self.num_logprobs = num_logprobs
        self.ids = torch.zeros(num_reqs, width, num_logprobs + 1, dtype=torch.int64)
        self.values = torch.zeros(num_reqs, width, num_logprobs + 1)
        self.ranks = torch.zeros(num_reqs, width, dtype=torch.int64)

    def record(
        self,
        rows: torch.Tensor,
        positions: torch.Tensor,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        mask_id: int | None,
    ) -> None:
        """Tokens ``[n]`` emitted at ``(rows, positions)``, chosen from ``logits [n, V]``."""
        if not rows.numel():
            return
        logprobs = token_logprobs(logits, mask_id=mask_id)
        k = min(self.num_logprobs, logprobs.shape[-1])
        ids, values, ranks = vi.gather_logprobs(logprobs, k, tokens.to(logprobs.device).long())
        rows, positions = rows.cpu(), positions.cpu()
        self.ids[rows, positions, : k + 1] = ids.cpu().to(self.ids.dtype)
        self.values[rows, positions, : k + 1] = values.cpu().to(self.values.dtype)
        self.ranks[rows, positions] = ranks.cpu().to(self.ranks.dtype)

    def tensors(self) -> Any:
        """vLLM's ``LogprobsTensors``, one row per ``(request, position)``."""
        rows = self.ids.shape[0] * self.ids.shape[1]
        return vi.logprobs_tensors(
            self.ids.view(rows, -1), self.values.view(rows, -1), self.ranks.view(rows)
        )

"""Output logprobs of the tokens a block step emits, in vLLM's layout.

Each emitted token is reported from the distribution it was committed from (the context
tower's for ``ar`` and a speculative verification, the denoiser pass that decided it for
``mask_diffusion`` and ``mock_ar``), in the server's ``--logprobs-mode``
(:func:`vllm_twotower.commit.reported_logprobs`), with either the step's top ``k``
alternatives and its rank (vLLM's ``Sampler.gather_logprobs``, ``vllm_internals``) or, when a
request of the step sets ``logprob_token_ids``, the values of exactly those ids, as vLLM's
``Sampler.gather_specific_token_logprobs`` does (then for every row of the step, as vLLM
does).  The reference records the same values (``GenerationResult.logprobs``), which is what
the tests hold the engine to.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_twotower import vllm_internals as vi
from vllm_twotower.commit import SamplingFilters, reported_logprobs


class StepLogprobs:
    """Logprobs of one step's ``[num_reqs, width]`` emitted tokens, filled mode by mode."""

    def __init__(
        self,
        num_reqs: int,
        width: int,
        num_logprobs: int | None,
        logprobs_mode: str,
        token_ids: dict[int, list[int]],
    ) -> None:
        """``num_logprobs`` alternatives per token, or, if ``token_ids`` (batch row -> the ids
        its request's ``logprob_token_ids`` names) is not empty, those ids' values."""
        self.logprobs_mode = logprobs_mode
        self.num_logprobs = num_logprobs or 0
        self.specific = torch.full((num_reqs, max(map(len, token_ids.values()), default=0)), -1)
        for row, ids in token_ids.items():
            self.specific[row, : len(ids)] = torch.tensor(ids)
        columns = 1 + (self.specific.shape[1] if token_ids else self.num_logprobs)
        self.ids = torch.zeros(num_reqs, width, columns, dtype=torch.int64)
        self.values = torch.zeros(num_reqs, width, columns)
        self.ranks = torch.zeros(num_reqs, width, dtype=torch.int64)

    def record(
        self,
        rows: torch.Tensor,
        positions: torch.Tensor,
        tokens: torch.Tensor,
        raw: torch.Tensor,
        *,
        mask_id: int | None,
        temperature: torch.Tensor,
        filters: SamplingFilters,
        adjusted: torch.Tensor | None = None,
    ) -> None:
        """Tokens ``[n]`` emitted at ``(rows, positions)``, chosen from the ``adjusted`` logits
        ``[n, V]`` (``raw`` when nothing adjusts them) of the model's ``raw`` ones under each
        token's ``temperature`` and ``filters`` ``[n]``."""
        if not rows.numel():
            return
        logprobs = reported_logprobs(
            raw,
            mask_id=mask_id,
            logprobs_mode=self.logprobs_mode,
            adjusted=adjusted,
            temperature=temperature.to(raw.device),
            filters=filters.to(raw.device),
        )
        tokens = tokens.to(logprobs.device).long()
        k = min(self.num_logprobs, logprobs.shape[-1])
        ids, values, ranks = vi.gather_logprobs(logprobs, k, tokens)
        if self.specific.shape[1]:  # vLLM: the named ids replace the top k, in every row
            named = self.specific[rows.cpu()].to(logprobs.device)
            ids = torch.cat([tokens[:, None], named.clamp(min=0)], dim=1)
            values = logprobs.gather(-1, ids)
            values[:, 1:] = values[:, 1:].masked_fill(named < 0, float("-inf"))
            k = named.shape[1]
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

"""The TwoTower model in plain PyTorch: context tower, denoiser tower, heads, time conditioning.

Module names mirror the checkpoint (``context_tower.*``, ``context_lm_head``,
``denoiser_tower.*``, ``lm_head``, ``t_embedder.mlp.{0,2}``, ``t_block.1``,
``scale_shift_tables.{l}``), so a state dict loads without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from vllm_twotower.checkpoint import check_names, kept_dtype, load_state_dict
from vllm_twotower.config import TwoTowerConfig
from vllm_twotower.reference.blocks import Backbone, ContextState

TIME_EMBEDDING_DIM = 256
TIME_SCALE = 1000.0


def timestep_embedding(t: torch.Tensor, dim: int = TIME_EMBEDDING_DIM) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` of ``t · 1000`` (PixArt-α / DiT convention).

    ``t: [B]`` in [0, 1] → ``[B, dim]`` float32, frequencies ``exp(-ln(10000)·i/(dim/2))``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.float() * TIME_SCALE)[:, None] * freqs.to(t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """``t_embedder``: sinusoidal embedding → Linear → SiLU → Linear."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIME_EMBEDDING_DIM, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))


def adaln_modulation(
    t_embedder: nn.Module, t_block: nn.Module, tables: Iterable[torch.Tensor], t: torch.Tensor
) -> torch.Tensor:
    """adaLN-single parameters ``[L, B, 3, H]`` (shift, scale, gate) for mask ratios ``t [B]``.

    ``shift, scale, gate = scale_shift_tables[l] + t_block(t_embedder(t)).view(3, H)``; the one
    definition the reference, the training code and the engine's denoiser all use.
    """
    t_emb = t_block(t_embedder(t)).view(t.shape[0], 3, -1)
    return torch.stack(list(tables))[:, None] + t_emb[None]


class TwoTowerModel(nn.Module):
    """Both towers and their heads; generation lives in :mod:`vllm_twotower.reference.generate`."""

    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        self.config = config
        hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
        self.context_tower = Backbone(config)
        self.context_lm_head = nn.Linear(hidden, vocab, bias=False)
        self.denoiser_tower = Backbone(config)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.t_embedder = TimestepEmbedder(hidden)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 3 * hidden))
        self.scale_shift_tables = nn.ParameterList(
            nn.Parameter(torch.zeros(3, hidden)) for _ in range(layers)
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> TwoTowerModel:
        """Load a checkpoint directory; missing or unexpected tensors raise, named."""
        config = TwoTowerConfig.from_pretrained(path)
        model = cls(config).to(dtype)
        for name, param in model.named_parameters():  # routers stay float32 (ROUTER_DTYPE)
            param.data = param.data.to(kept_dtype(name, dtype))
        state_dict = load_state_dict(path, dtype)
        check_names(set(model.state_dict()), set(state_dict), source=str(path))
        model.load_state_dict(state_dict)
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # -- context tower --------------------------------------------------------------------
    def empty_context(self) -> ContextState:
        return self.context_tower.empty_state(self.device)

    def extend_context(
        self, input_ids: torch.Tensor, state: ContextState
    ) -> tuple[torch.Tensor, ContextState]:
        """Causally read ``input_ids [T]`` after ``state``; return ``(AR logits [T, V], state)``.

        Used for the prompt prefill, for token-by-token AR decoding and for the block-wise
        extension by each committed diffusion block: all three are the same causal forward.
        """
        hidden, state = self.context_tower(input_ids, state, causal=True)
        return self.context_lm_head(hidden).float(), state

    # -- denoiser tower -------------------------------------------------------------------
    def time_modulation(self, t: float) -> torch.Tensor:
        """Per-layer adaLN parameters ``[L, 3, H]`` (shift, scale, gate) for mask ratio ``t``."""
        t_batch = torch.tensor([t], device=self.device)
        per_row = adaln_modulation(self.t_embedder, self.t_block, self.scale_shift_tables, t_batch)
        return per_row[:, 0]

    def denoise(self, canvas: torch.Tensor, context: ContextState, t: float | None) -> torch.Tensor:
        """Denoiser logits ``[S, V]`` (float32) for the block ``canvas [S]`` after ``context``.

        Attention joins the context tower's keys/values of the same layer with the block's own,
        unmasked; Mamba layers start from the context tower's states; the states this pass
        produces are discarded.  ``t = None`` runs without time conditioning (mock-AR).
        """
        modulation = None if t is None else self.time_modulation(t)
        hidden, _ = self.denoiser_tower(canvas, context, causal=False, modulation=modulation)
        return self.lm_head(hidden).float()

"""The denoiser tower: vLLM's Nemotron-H layers, built without caches, plus time conditioning.

The denoiser has the context tower's architecture and its own weights.  Its layers are vLLM's
own Nemotron-H decoder-layer classes (so weights load and shard exactly as the context tower's
do), built without registering their attention / Mamba modules for a cache: the denoiser keeps
no persistent state.  A pass runs through :func:`~vllm_twotower.model.blockwise.run_layers`
over the context tower's caches of the same layers, with adaLN-single time modulation
(``shared/spec/twotower-model.md`` §3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)

from vllm_twotower import vllm_internals as vi
from vllm_twotower.model.blockwise import BlockContext, MambaOptions, run_layers
from vllm_twotower.reference.model import TimestepEmbedder, adaln_modulation


def mamba_options(config: object) -> MambaOptions:
    """Backbone-wide Mamba settings of a Nemotron-H HF config."""
    limit = getattr(config, "time_step_limit", None) or (0.0, float("inf"))
    chunk = getattr(config, "chunk_size", None) or getattr(config, "mamba_chunk_size", 128)
    return MambaOptions((float(limit[0]), float(limit[1])), int(chunk))


@contextlib.contextmanager
def cacheless_layers(vllm_config: VllmConfig) -> Iterator[None]:
    """Build layers whose attention / Mamba modules get no KV or state cache.

    vLLM allocates a cache for every ``AttentionLayerBase`` registered in the static forward
    context; removing the ones created here keeps the denoiser stateless.  Other registrations
    (fused MoE layers look themselves up by name) are kept.
    """
    context = vi.forward_context_layers(vllm_config)
    before = set(context)
    yield
    for name in set(context) - before:
        if isinstance(context[name], AttentionLayerBase):
            del context[name]


class DenoiserTower(nn.Module):
    """Denoiser backbone, its ``lm_head`` and the time-conditioning modules."""

    def __init__(
        self,
        *,
        vllm_config: VllmConfig,
        layer_types: dict[str, type[nn.Module]],
        prefix: str = "",
    ) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        hidden = config.hidden_size
        pattern = config.hybrid_override_pattern
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, hidden, prefix=f"{prefix}.embed_tokens"
        )
        with cacheless_layers(vllm_config):
            self.layers = nn.ModuleList(
                layer_types[symbol](
                    config=config,
                    layer_idx=i,
                    model_config=vllm_config.model_config,
                    cache_config=vllm_config.cache_config,
                    quant_config=vllm_config.quant_config,
                    parallel_config=vllm_config.parallel_config,
                    prefix=f"{prefix}.layers.{i}",
                )
                for i, symbol in enumerate(pattern)
            )
        self.norm_f = RMSNorm(hidden, eps=config.layer_norm_epsilon)
        self.lm_head = ParallelLMHead(config.vocab_size, hidden, prefix=f"{prefix}.lm_head")
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.t_embedder = TimestepEmbedder(hidden)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 3 * hidden))
        self.scale_shift_tables = nn.ParameterList(
            nn.Parameter(torch.zeros(3, hidden), requires_grad=False) for _ in pattern
        )
        self.mamba_options = mamba_options(config)
        self._modulation_memo: dict[float, torch.Tensor] = {}  # mask ratio -> [L, 3, H]

    def modulation(self, t: torch.Tensor) -> torch.Tensor:
        """adaLN parameters ``[L, B, 3, H]`` (shift, scale, gate) for mask ratios ``t [B]``.

        Memoised per value of ``t``: a block of ``S`` positions has at most ``S + 1`` mask
        ratios, and recomputing the time embedding and ``t_block`` costs every pass ~70 ops.
        """
        ratios = t.tolist()
        missing = sorted(set(ratios) - self._modulation_memo.keys())
        if missing:
            fresh = adaln_modulation(
                self.t_embedder,
                self.t_block,
                self.scale_shift_tables,
                torch.tensor(missing, dtype=t.dtype, device=t.device),
            )
            self._modulation_memo.update(zip(missing, fresh.unbind(1), strict=True))
        return torch.stack([self._modulation_memo[r] for r in ratios], dim=1)

    def forward(
        self,
        canvas: torch.Tensor,
        context: BlockContext,
        t: torch.Tensor | None,
        block_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, S, V]`` (float32) for the blocks ``canvas [B, S]`` after ``context``.

        ``t [B]`` is each block's mask ratio; ``None`` runs unconditioned (mock-AR).
        ``block_lens [B]``: a block shorter than ``S`` occupies the first positions of its row;
        attention ignores the rest (Mamba is causal and MoE per token, so trailing padding
        cannot reach the real positions there).
        """
        batch, size = canvas.shape
        if block_lens is None:
            block_lens = torch.full((batch,), size, dtype=torch.long)
        x = self.embed_tokens(canvas.reshape(-1)).view(batch, size, -1)
        x, _ = run_layers(
            self.layers,
            x,
            context,
            modulation=self.modulation(t) if t is not None else None,
            causal=False,
            block_lens=block_lens,
            mamba_options=self.mamba_options,
        )
        hidden = self.norm_f(x.reshape(batch * size, -1))
        logits = self.logits_processor(self.lm_head, hidden)
        return logits.float().view(batch, size, -1)

"""``NemotronHTwoTowerForCausalLM``: the TwoTower checkpoint as a vLLM model.

* The **context tower** is vLLM's own ``NemotronHModel`` (Mamba-2 mixers on vLLM's state cache,
  paged ``Attention``), with the MoE layers swapped for :class:`~.moe.TwoTowerMoE` where vLLM's
  fused MoE cannot run relu² experts (CPU).  vLLM's runner drives it like any causal LM: prompt
  and committed tokens are ordinary scheduled tokens, and ``compute_logits`` applies
  ``context_lm_head``, so AR decoding needs nothing more.
* The **denoiser tower** (:class:`~.denoiser.DenoiserTower`) is invoked by the TwoTower model
  runner after the context pass, through :meth:`denoise`; it reads the context tower's caches
  and writes none.

The class borrows NemotronH's cache-shape class methods (both towers have the same layers, and
only the context tower owns caches) but not ``NemotronHForCausalLM`` itself, whose constructor
and MoE bookkeeping assume vLLM's fused MoE.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.nemotron_h import (
    ALL_DECODER_LAYER_TYPES,
    NemotronHForCausalLM,
    NemotronHModel,
)
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.sequence import IntermediateTensors

from vllm_twotower.checkpoint import canonical_name
from vllm_twotower.config import TwoTowerConfig
from vllm_twotower.layout import LoadAudit, check_parameters_filled
from vllm_twotower.model.blockwise import BlockContext, MambaStates, run_layers
from vllm_twotower.model.denoiser import DenoiserTower, mamba_options
from vllm_twotower.model.moe import TwoTowerMoEDecoderLayer, needs_project_moe


def decoder_layer_types() -> dict[str, type[nn.Module]]:
    """vLLM's Nemotron-H layer classes, with the project's MoE layer where vLLM's cannot run."""
    if needs_project_moe():
        return {**ALL_DECODER_LAYER_TYPES, "E": TwoTowerMoEDecoderLayer}
    return dict(ALL_DECODER_LAYER_TYPES)


class NemotronHTwoTowerForCausalLM(nn.Module, HasInnerState, IsHybrid):
    """Both towers and heads of a TwoTower checkpoint."""

    # Checkpoint names (after checkpoint.canonical_name) -> module names.  The regex runs
    # before the prefixes, so the denoiser's `lm_head` moves out of the way before the
    # context head takes the name vLLM's runner and LogitsProcessor use.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_regex={re.compile(r"^lm_head\."): "denoiser.lm_head."},
        orig_to_new_substr={"A_log": "A", "embeddings": "embed_tokens"},
        orig_to_new_stacked={
            ".q_proj": (".qkv_proj", "q"),
            ".k_proj": (".qkv_proj", "k"),
            ".v_proj": (".qkv_proj", "v"),
        },
        orig_to_new_prefix={
            "context_lm_head.": "lm_head.",
            "context_tower.": "model.",
            "denoiser_tower.": "denoiser.",
            "t_embedder.": "denoiser.t_embedder.",
            "t_block.": "denoiser.t_block.",
            "scale_shift_tables.": "denoiser.scale_shift_tables.",
            "mtp.": None,
        },
    )
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"]
    }

    get_mamba_state_dtype_from_config = NemotronHForCausalLM.get_mamba_state_dtype_from_config
    get_mamba_state_shape_from_config = NemotronHForCausalLM.get_mamba_state_shape_from_config
    get_mamba_state_copy_func = NemotronHForCausalLM.get_mamba_state_copy_func

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.vllm_config = vllm_config
        self.quant_config = vllm_config.quant_config
        layer_types = decoder_layer_types()
        self.model = NemotronHModel(
            vllm_config=vllm_config,
            prefix=maybe_prefix(prefix, "model"),
            decoder_layer_types=layer_types,
        )
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head")
        )
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.denoiser = DenoiserTower(
            vllm_config=vllm_config,
            layer_types=layer_types,
            prefix=maybe_prefix(prefix, "denoiser"),
        )
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        """The context tower over this step's scheduled tokens (fills KV and Mamba states)."""
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """AR logits of the context tower (``context_lm_head``)."""
        return self.logits_processor(self.lm_head, hidden_states)

    def denoise(
        self,
        canvas: torch.Tensor,
        context: BlockContext,
        t: torch.Tensor | None,
        block_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoiser logits ``[B, S, V]`` float32 for block canvases after their contexts."""
        return self.denoiser(canvas, context, t, block_lens)

    def _context_pass(
        self, token_ids: torch.Tensor, context: BlockContext, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MambaStates]:
        """A cache-free causal pass of the context tower's own layers over ``token_ids [B, n]``
        after ``context`` (row ``b``'s first ``lengths[b]`` tokens; all ``n`` by default):
        hidden states before the final norm, and the Mamba states after the tokens."""
        batch, size = token_ids.shape
        x = self.model.embed_input_ids(token_ids.reshape(-1)).view(batch, size, -1)
        return run_layers(
            self.model.layers,
            x,
            context,
            modulation=None,
            causal=True,
            block_lens=torch.full((batch,), size) if lengths is None else lengths,
            mamba_options=mamba_options(self.config),
        )

    def advance_context(self, token_ids: torch.Tensor, context: BlockContext) -> MambaStates:
        """Mamba states of the context tower after reading ``token_ids [1, n]`` past ``context``.

        Mock-AR needs the state one token before the last, which vLLM's cache no longer holds
        after a prefill.
        """
        return self._context_pass(token_ids, context)[1]

    def score_draft(
        self, token_ids: torch.Tensor, context: BlockContext, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Context-tower (AR) logits ``[B, S, V]`` float32 over draft blocks past ``context``.

        Speculative verification: logit ``i`` is what the context tower predicts after the
        draft's first ``i + 1`` tokens.  Nothing is written to vLLM's caches.
        """
        batch, size = token_ids.shape
        hidden, _ = self._context_pass(token_ids, context, lengths)
        hidden = self.model.norm_f(hidden.reshape(batch * size, -1))
        return self.compute_logits(hidden).view(batch, size, -1).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load a checkpoint strictly: every parameter, every expert, nothing unexpected.

        vLLM's own checks miss a partial download (see :mod:`vllm_twotower.layout`), so the
        stream is audited against the config's layout on its way to vLLM's loader, and every
        parameter must then have been reached; either failure raises a ``CheckpointError``
        naming the tensors.
        """
        source = str(self.vllm_config.model_config.model)
        audit = LoadAudit(
            TwoTowerConfig.from_dict(self.config.to_dict(), source=f"{source} config"),
            source=source,
            routed_experts_optional=self.vllm_config.parallel_config.enable_expert_parallel,
        )
        canonical = ((canonical_name(name), tensor) for name, tensor in weights)
        loader = AutoWeightsLoader(self)
        loaded = loader.load_weights(audit.filter(canonical), mapper=self.hf_to_vllm_mapper)
        audit.check()
        # Quantization (online or from a quantized checkpoint) adds parameters no bf16
        # checkpoint tensor fills, such as scales; vLLM's own check covers those models.
        if self.vllm_config.model_config.quantization is None:
            params = (name for name, _ in self.named_parameters())
            check_parameters_filled(params, loaded, source=source)
        return loaded

"""The tensors a TwoTower checkpoint must hold, and a strict audit of a load against them.

:func:`checkpoint_layout` writes down, from the config alone, every tensor name and shape of the
Hugging Face layout (``shared/spec/twotower-model.md`` §2): both towers (``context_tower.*``,
``denoiser_tower.*``), both heads, ``t_embedder``, ``t_block`` and one ``scale_shift_tables.{l}``
per layer.  For the real config that is 12,544 tensors, 63,185,902,848 elements.

:class:`LoadAudit` sits between a checkpoint's tensor stream and vLLM's loader.  It exists
because vLLM's own checks cannot see a partial download: its post-load check exempts every
module with a quantization method (all linear layers, embeddings, fused MoE) on an unquantized
model, its fused-MoE loader reports a stacked expert parameter as loaded after any one expert,
``AutoWeightsLoader`` silently ignores unexpected ``*.bias`` tensors, and the fused-MoE loader
silently drops an expert id it has no slot for.  The audit records every name and shape before
vLLM sees it (so it does not depend on which MoE implementation runs), passes on only tensors
the layout expects, and raises one :class:`~vllm_twotower.checkpoint.CheckpointError` naming
every missing, unexpected, misshaped or duplicated tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from vllm_twotower.checkpoint import CheckpointError, kept_dtype, name_list
from vllm_twotower.config import ATTENTION, MAMBA, MLP, MOE, TwoTowerConfig

#: Checkpoint prefixes the project skips on purpose: NVIDIA's multi-token-prediction head,
#: which TwoTower generation does not use (vLLM's NemotronH skips it too).
SKIPPED_PREFIXES = ("mtp.",)
TOWERS = ("context_tower", "denoiser_tower")
#: Width of the sinusoidal time embedding fed to ``t_embedder.mlp.0``.
TIME_EMBEDDING_DIM = 256

_ROUTED_EXPERT = re.compile(r"\.mixer\.experts\.\d+\.")

Shape = tuple[int, ...]


def _mixer_layout(config: TwoTowerConfig, symbol: str) -> dict[str, Shape]:
    hidden = config.hidden_size
    if symbol == MAMBA:
        inner, heads = config.mamba_intermediate_size, config.mamba_num_heads
        conv_dim = inner + 2 * config.n_groups * config.ssm_state_size
        out = {
            "in_proj.weight": (inner + conv_dim + heads, hidden),
            "conv1d.weight": (conv_dim, 1, config.conv_kernel),
            "dt_bias": (heads,),
            "A_log": (heads,),
            "D": (heads,),
            "norm.weight": (inner,),
            "out_proj.weight": (hidden, inner),
        }
        if config.use_conv_bias:
            out["conv1d.bias"] = (conv_dim,)
        return out
    if symbol == ATTENTION:
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        return {
            "q_proj.weight": (q, hidden),
            "k_proj.weight": (kv, hidden),
            "v_proj.weight": (kv, hidden),
            "o_proj.weight": (hidden, q),
        }
    if symbol == MLP:
        return {
            "up_proj.weight": (config.intermediate_size, hidden),
            "down_proj.weight": (hidden, config.intermediate_size),
        }
    assert symbol == MOE, symbol
    experts, inter = config.n_routed_experts, config.moe_intermediate_size
    out = {"gate.weight": (experts, hidden), "gate.e_score_correction_bias": (experts,)}
    for e in range(experts):
        out[f"experts.{e}.up_proj.weight"] = (inter, hidden)
        out[f"experts.{e}.down_proj.weight"] = (hidden, inter)
    shared = config.moe_shared_expert_intermediate_size * config.n_shared_experts
    if shared:
        out["shared_experts.up_proj.weight"] = (shared, hidden)
        out["shared_experts.down_proj.weight"] = (hidden, shared)
    return out


def checkpoint_layout(config: TwoTowerConfig) -> dict[str, Shape]:
    """Every tensor name of a TwoTower checkpoint with this config, with its shape."""
    hidden, vocab = config.hidden_size, config.vocab_size
    layout: dict[str, Shape] = {}
    for tower in TOWERS:
        layout[f"{tower}.embeddings.weight"] = (vocab, hidden)
        for i, symbol in enumerate(config.pattern):
            layout[f"{tower}.layers.{i}.norm.weight"] = (hidden,)
            for name, shape in _mixer_layout(config, symbol).items():
                layout[f"{tower}.layers.{i}.mixer.{name}"] = shape
        layout[f"{tower}.norm_f.weight"] = (hidden,)
    layout["context_lm_head.weight"] = (vocab, hidden)
    layout["lm_head.weight"] = (vocab, hidden)
    layout["t_embedder.mlp.0.weight"] = (hidden, TIME_EMBEDDING_DIM)
    layout["t_embedder.mlp.0.bias"] = (hidden,)
    layout["t_embedder.mlp.2.weight"] = (hidden, hidden)
    layout["t_embedder.mlp.2.bias"] = (hidden,)
    layout["t_block.1.weight"] = (3 * hidden, hidden)
    layout["t_block.1.bias"] = (3 * hidden,)
    for i in range(config.num_hidden_layers):
        layout[f"scale_shift_tables.{i}"] = (3, hidden)
    return layout


def meta_checkpoint(
    config: TwoTowerConfig, dtype: torch.dtype = torch.bfloat16
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, meta tensor)`` for every tensor of the layout: a checkpoint with no data,
    stored as NVIDIA's bf16 one is (routers in float32)."""
    for name, shape in checkpoint_layout(config).items():
        yield name, torch.empty(shape, dtype=kept_dtype(name, dtype), device="meta")


class LoadAudit:
    """Checks a checkpoint's tensor stream against :func:`checkpoint_layout` while it passes.

    ``routed_experts_optional``: with expert parallelism vLLM's loader drops the routed experts
    other ranks own before the model sees them, so their absence is not an error there.
    """

    def __init__(
        self, config: TwoTowerConfig, *, source: str, routed_experts_optional: bool = False
    ) -> None:
        self.expected = checkpoint_layout(config)
        self.source = source
        self.routed_experts_optional = routed_experts_optional
        self.seen: set[str] = set()
        self.unexpected: list[str] = []
        self.duplicated: list[str] = []
        self.misshaped: list[str] = []
        self.skipped: list[str] = []

    def filter(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the tensors the layout expects (each once, with its shape); record the rest."""
        for name, tensor in weights:
            if name.startswith(SKIPPED_PREFIXES):
                self.skipped.append(name)
                continue
            shape = self.expected.get(name)
            if shape is None:
                self.unexpected.append(name)
            elif name in self.seen:
                self.duplicated.append(name)
            elif tuple(tensor.shape) != shape:
                self.seen.add(name)
                self.misshaped.append(f"{name} {tuple(tensor.shape)} (expected {shape})")
            else:
                self.seen.add(name)
                yield name, tensor

    def missing(self) -> list[str]:
        """Expected tensors the stream did not deliver (in layout order)."""
        missing = [name for name in self.expected if name not in self.seen]
        if self.routed_experts_optional:
            missing = [name for name in missing if not _ROUTED_EXPERT.search(name)]
        return missing

    def check(self) -> None:
        """Raise :class:`CheckpointError` naming every problem the stream had."""
        missing = self.missing()
        problems = [
            (label, names)
            for label, names in (
                (f"{len(missing)} missing tensors", missing),
                (f"{len(self.unexpected)} unexpected tensors", self.unexpected),
                (f"{len(self.misshaped)} tensors with the wrong shape", self.misshaped),
                (f"{len(self.duplicated)} tensors stored twice", self.duplicated),
            )
            if names
        ]
        if problems:
            parts = "; ".join(f"{label}: {name_list(names)}" for label, names in problems)
            raise CheckpointError(
                f"{self.source}: the checkpoint does not fill the model ({parts}). "
                f"A partial or damaged download? (skipped on purpose: {list(SKIPPED_PREFIXES)})"
            )


def check_parameters_filled(
    parameter_names: Iterable[str], loaded: set[str], *, source: str
) -> None:
    """Raise :class:`CheckpointError` for model parameters no checkpoint tensor reached.

    Unlike vLLM's post-load check this exempts nothing: a parameter of a linear layer or a
    fused MoE the checkpoint never wrote holds uninitialised memory.
    """
    unfilled = sorted(set(parameter_names) - loaded)
    if unfilled:
        raise CheckpointError(
            f"{source}: {len(unfilled)} model parameters were not filled by the checkpoint: "
            f"{name_list(unfilled)}"
        )

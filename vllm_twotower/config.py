"""Typed TwoTower configuration read from a checkpoint's ``config.json``.

A TwoTower checkpoint carries an ordinary Nemotron-H ``config.json`` (``model_type:
nemotron_h``) whose ``architectures`` name ``NemotronHTwoTowerForCausalLM``; both towers share
that backbone configuration.  The diffusion defaults (block size, steps per block, mask id,
threshold, temperature) are not config fields: they come from ``generation_config.json`` when
present, else from NVIDIA's published operating point.

Nemotron-H configs spell several Mamba fields two ways (``mamba_n_groups`` / ``n_groups``, …)
and may give the layer layout as ``hybrid_override_pattern`` or ``layers_block_type``; both are
accepted.  Every validation error names the field and the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from vllm_twotower import ARCHITECTURE

MAMBA, ATTENTION, MOE, MLP = "M", "*", "E", "-"
_LAYER_TYPE_TO_SYMBOL = {
    "mamba": MAMBA,
    "linear_attention": MAMBA,
    "attention": ATTENTION,
    "full_attention": ATTENTION,
    "moe": MOE,
    "mlp": MLP,
}
#: Field aliases used by older Nemotron-H configs, mapped to the names used here.
_ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_chunk_size": "chunk_size",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_dt_limit": "time_step_limit",
    "attention_head_dim": "head_dim",
}


class ConfigError(ValueError):
    """A TwoTower config or generation config is malformed; the message names field and file."""

    def __init__(self, source: str, field_name: str, problem: str) -> None:
        super().__init__(f"{source}: field '{field_name}' {problem}")
        self.source = source
        self.field_name = field_name


@dataclass(frozen=True)
class DiffusionDefaults:
    """Generation defaults of mask diffusion (``generation_config.json`` or the published ones)."""

    block_size: int = 16
    steps_per_block: int = 16
    mask_token_id: int = 3
    confidence_threshold: float = 0.8
    temperature: float = 0.0

    def validate(self, source: str, max_block_size: int, vocab_size: int) -> None:
        """Raise :class:`ConfigError` for a value no request could be served with."""
        if not 1 <= self.block_size <= max_block_size:
            raise ConfigError(
                source, "block_size", f"must be in [1, {max_block_size}], got {self.block_size}"
            )
        if self.steps_per_block < 1:
            raise ConfigError(
                source, "steps_per_block", f"must be >= 1, got {self.steps_per_block}"
            )
        if not 0 <= self.mask_token_id < vocab_size:
            raise ConfigError(
                source,
                "mask_token_id",
                f"must be a token id < {vocab_size}, got {self.mask_token_id}",
            )
        if not 0.0 < self.confidence_threshold <= 1.0:
            raise ConfigError(
                source,
                "confidence_threshold",
                f"must be in (0, 1], got {self.confidence_threshold}",
            )
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ConfigError(source, "temperature", f"must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class TwoTowerConfig:
    """The backbone shared by both towers, plus the diffusion defaults."""

    vocab_size: int
    hidden_size: int
    pattern: str  # one symbol per layer: M (Mamba-2), * (attention), E (MoE), - (dense MLP)
    # attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # Mamba-2
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int
    chunk_size: int
    use_conv_bias: bool = True
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # MoE and dense MLP
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_shared_expert_intermediate_size: int = 0
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    intermediate_size: int = 0
    # misc
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    diffusion: DiffusionDefaults = field(default_factory=DiffusionDefaults)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.pattern)

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def max_block_size(self) -> int:
        """The largest block the denoiser was trained for (block size = Mamba chunk size)."""
        return self.chunk_size

    def layer_indices(self, symbol: str) -> list[int]:
        """Indices of the layers of one type (``MAMBA``, ``ATTENTION``, ``MOE``, ``MLP``)."""
        return [i for i, s in enumerate(self.pattern) if s == symbol]

    def with_diffusion(self, **overrides: Any) -> TwoTowerConfig:
        """A copy with some diffusion defaults replaced (validated)."""
        diffusion = replace(self.diffusion, **overrides)
        diffusion.validate("overrides", self.max_block_size, self.vocab_size)
        return replace(self, diffusion=diffusion)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` content of a checkpoint with this configuration."""
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURE],
            "model_type": "nemotron_h",
            "hybrid_override_pattern": self.pattern,
            "num_hidden_layers": self.num_hidden_layers,
            "mamba_ssm_cache_dtype": "float32",
            "mlp_hidden_act": "relu2",
            "mamba_hidden_act": "silu",
            "n_group": 1,
            "topk_group": 1,
        }
        for f in fields(self):
            if f.name in ("pattern", "diffusion"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if self.intermediate_size == 0:
            out.pop("intermediate_size")
        # (0, inf) is NemotronHConfig's default, and transformers' strict config rejects the
        # string "inf" that is JSON's only spelling of it: write the field only when it differs.
        if self.time_step_limit == (0.0, math.inf):
            out.pop("time_step_limit")
        return out

    def generation_config_dict(self) -> dict[str, Any]:
        """The ``generation_config.json`` content carrying the diffusion defaults."""
        d = self.diffusion
        return {
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "mask_token_id": d.mask_token_id,
            "block_size": d.block_size,
            "steps_per_block": d.steps_per_block,
            "confidence_threshold": d.confidence_threshold,
            "temperature": d.temperature,
        }

    @classmethod
    def from_dict(
        cls,
        raw: dict[str, Any],
        *,
        source: str = "config.json",
        generation: dict[str, Any] | None = None,
        generation_source: str = "generation_config.json",
    ) -> TwoTowerConfig:
        """Build and validate a config from ``config.json`` (and generation config) content."""
        raw = {_ALIASES.get(k, k): v for k, v in raw.items()}
        kwargs: dict[str, Any] = {"pattern": _read_pattern(raw, source)}
        for f in fields(cls):
            if f.name in ("pattern", "diffusion"):
                continue
            if f.name in raw and raw[f.name] is not None:
                kwargs[f.name] = _coerce(raw[f.name], f.name, f.type, source)
            elif f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(source, f.name, "is missing")
        if isinstance(raw.get("eos_token_id"), list):
            kwargs["eos_token_id"] = int(raw["eos_token_id"][0])
        config = cls(**kwargs)
        config._validate(source)
        diffusion = _read_diffusion(generation or {}, generation_source)
        diffusion.validate(generation_source, config.max_block_size, config.vocab_size)
        return replace(config, diffusion=diffusion)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TwoTowerConfig:
        """Read ``config.json`` (and ``generation_config.json`` if present) from a directory."""
        path = Path(path)
        config_file = path / "config.json"
        raw = _read_json(config_file)
        archs = raw.get("architectures") or []
        if ARCHITECTURE not in archs:
            raise ConfigError(str(config_file), "architectures", f"must contain {ARCHITECTURE!r}")
        gen_file = path / "generation_config.json"
        generation = _read_json(gen_file) if gen_file.exists() else None
        return cls.from_dict(
            raw, source=str(config_file), generation=generation, generation_source=str(gen_file)
        )

    def _validate(self, source: str) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "mamba_num_heads",
            "mamba_head_dim",
            "ssm_state_size",
            "n_groups",
            "conv_kernel",
            "chunk_size",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(source, name, f"must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                source,
                "num_key_value_heads",
                f"({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})",
            )
        if self.mamba_num_heads % self.n_groups:
            raise ConfigError(
                source,
                "n_groups",
                f"({self.n_groups}) must divide mamba_num_heads ({self.mamba_num_heads})",
            )
        if MOE in self.pattern:
            for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
                if getattr(self, name) <= 0:
                    raise ConfigError(source, name, "must be positive for a pattern with E layers")
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ConfigError(
                    source,
                    "num_experts_per_tok",
                    f"({self.num_experts_per_tok}) exceeds n_routed_experts "
                    f"({self.n_routed_experts})",
                )
        if MLP in self.pattern and self.intermediate_size <= 0:
            raise ConfigError(source, "intermediate_size", "must be positive for '-' layers")
        if self.tie_word_embeddings:
            raise ConfigError(source, "tie_word_embeddings", "must be false (TwoTower is untied)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "<file>", "does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), "<file>", f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "<file>", "must hold a JSON object")
    return data


def _read_pattern(raw: dict[str, Any], source: str) -> str:
    if "hybrid_override_pattern" in raw:
        pattern = raw["hybrid_override_pattern"]
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(source, "hybrid_override_pattern", "must be a non-empty string")
        bad = sorted(set(pattern) - {MAMBA, ATTENTION, MOE, MLP})
        if bad:
            raise ConfigError(source, "hybrid_override_pattern", f"has unknown layer symbols {bad}")
    elif "layers_block_type" in raw:
        types = raw["layers_block_type"]
        unknown = sorted({t for t in types if t not in _LAYER_TYPE_TO_SYMBOL})
        if unknown:
            raise ConfigError(source, "layers_block_type", f"has unknown layer types {unknown}")
        pattern = "".join(_LAYER_TYPE_TO_SYMBOL[t] for t in types)
    else:
        raise ConfigError(source, "hybrid_override_pattern", "is missing")
    layers = raw.get("num_hidden_layers")
    if layers is not None and layers != len(pattern):
        raise ConfigError(
            source,
            "num_hidden_layers",
            f"({layers}) does not match the layer pattern's length ({len(pattern)})",
        )
    return pattern


def _coerce(value: Any, name: str, type_name: Any, source: str) -> Any:
    """Coerce a JSON value to the dataclass field's type, naming the field when it cannot."""
    type_str = str(type_name)
    try:
        if type_str == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if type_str == "int":
            if isinstance(value, bool) or int(value) != value:
                raise TypeError
            return int(value)
        if type_str == "float":
            return float(value)
        if type_str.startswith("tuple"):
            return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(source, name, f"has an invalid value {value!r} ({type_str})") from None
    return value


def _read_diffusion(raw: dict[str, Any], source: str) -> DiffusionDefaults:
    kwargs: dict[str, Any] = {}
    for f in fields(DiffusionDefaults):
        if f.name in raw and raw[f.name] is not None:
            kwargs[f.name] = _coerce(raw[f.name], f.name, f.type, source)
    return DiffusionDefaults(**kwargs)

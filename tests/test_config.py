"""Config reading: defaults, aliases, and errors that name the field and the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_twotower.config import ConfigError, TwoTowerConfig
from vllm_twotower.tools.make_tiny import tiny_config


def _write(tmp_path: Path, config: dict, generation: dict | None = None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def _base() -> dict:
    return tiny_config().to_hf_dict()


def test_defaults_without_generation_config(tmp_path: Path) -> None:
    config = TwoTowerConfig.from_pretrained(_write(tmp_path, _base()))
    d = config.diffusion
    assert (d.block_size, d.steps_per_block, d.mask_token_id) == (16, 16, 3)
    assert (d.confidence_threshold, d.temperature) == (0.8, 0.0)


def test_generation_config_overrides_defaults(tmp_path: Path) -> None:
    gen = {"block_size": 8, "steps_per_block": 4, "confidence_threshold": 0.9}
    config = TwoTowerConfig.from_pretrained(_write(tmp_path, _base(), gen))
    assert (config.diffusion.block_size, config.diffusion.steps_per_block) == (8, 4)
    assert config.diffusion.confidence_threshold == 0.9


def test_aliases_and_layer_type_lists(tmp_path: Path) -> None:
    raw = _base()
    raw["mamba_n_groups"] = raw.pop("n_groups")
    raw["mamba_d_conv"] = raw.pop("conv_kernel")
    raw["mamba_chunk_size"] = raw.pop("chunk_size")
    pattern = raw.pop("hybrid_override_pattern")
    names = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
    raw["layers_block_type"] = [names[s] for s in pattern]
    assert TwoTowerConfig.from_pretrained(_write(tmp_path, raw)) == tiny_config()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_hidden_layers": 3}, "num_hidden_layers"),
        ({"hybrid_override_pattern": "MX*"}, "hybrid_override_pattern"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"head_dim": 0}, "head_dim"),
        ({"n_groups": 3}, "n_groups"),
        ({"hidden_size": "wide"}, "hidden_size"),
        ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
        ({"vocab_size": None}, "vocab_size"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ],
)
def test_malformed_config_names_field_and_file(tmp_path: Path, change: dict, field: str) -> None:
    raw = {**_base(), **change}
    with pytest.raises(ConfigError) as err:
        TwoTowerConfig.from_pretrained(_write(tmp_path, raw))
    assert f"'{field}'" in str(err.value)
    assert str(tmp_path / "config.json") in str(err.value)
    assert err.value.field_name == field


@pytest.mark.parametrize(
    ("gen", "field"),
    [
        ({"block_size": 32}, "block_size"),  # larger than the trained block (chunk size 16)
        ({"steps_per_block": 0}, "steps_per_block"),
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
        ({"mask_token_id": 1000}, "mask_token_id"),
        ({"steps_per_block": 2.5}, "steps_per_block"),
    ],
)
def test_malformed_generation_config(tmp_path: Path, gen: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        TwoTowerConfig.from_pretrained(_write(tmp_path, _base(), gen))
    assert f"'{field}'" in str(err.value)
    assert "generation_config.json" in str(err.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        TwoTowerConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TwoTowerConfig.from_pretrained(tmp_path)

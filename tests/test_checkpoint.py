"""Checkpoint I/O: round trips, sharding, legacy spellings, dtype conversion, named errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vllm_twotower.checkpoint import (
    INDEX_FILE,
    CheckpointError,
    canonical_name,
    is_router_tensor,
    kept_dtype,
    load_state_dict,
    save_checkpoint,
)
from vllm_twotower.config import TwoTowerConfig
from vllm_twotower.reference import TwoTowerModel
from vllm_twotower.tools.make_tiny import make_tiny_checkpoint, tiny_config


def test_checkpoint_has_the_real_layout(tiny_checkpoint: Path) -> None:
    names = set(load_state_dict(tiny_checkpoint))
    for expected in [
        "context_tower.embeddings.weight",
        "context_tower.layers.0.mixer.A_log",
        "context_tower.layers.0.mixer.conv1d.weight",
        "context_tower.layers.1.mixer.q_proj.weight",
        "context_tower.layers.2.mixer.gate.e_score_correction_bias",
        "context_tower.layers.2.mixer.experts.7.down_proj.weight",
        "context_tower.layers.2.mixer.shared_experts.up_proj.weight",
        "context_tower.norm_f.weight",
        "context_lm_head.weight",
        "denoiser_tower.layers.6.mixer.o_proj.weight",
        "lm_head.weight",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.bias",
        "t_block.1.weight",
        "scale_shift_tables.6",
    ]:
        assert expected in names
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["NemotronHTwoTowerForCausalLM"]
    assert config["model_type"] == "nemotron_h"
    assert (tiny_checkpoint / "tokenizer.json").exists()


def test_sharded_round_trip_in_bfloat16(tmp_path: Path, tiny_checkpoint: Path) -> None:
    make_tiny_checkpoint(tmp_path, seed=0, dtype=torch.bfloat16, max_shard_bytes=200_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded = load_state_dict(tmp_path, dtype=torch.float32)
    single = load_state_dict(tiny_checkpoint)
    assert sharded.keys() == single.keys()
    for name, tensor in single.items():
        assert sharded[name].dtype == torch.float32
        stored = kept_dtype(name, torch.bfloat16)  # routers are stored in float32
        torch.testing.assert_close(sharded[name], tensor.to(stored).float())
    assert any(is_router_tensor(name) for name in single)


def test_legacy_spellings_are_accepted(tmp_path: Path, tiny_checkpoint: Path) -> None:
    state = load_state_dict(tiny_checkpoint)
    legacy = {}
    for name, tensor in state.items():
        name = name.replace("context_tower.embeddings.", "backbone.embedding.")
        legacy[name.replace("context_tower.", "backbone.")] = tensor
    assert "backbone.embedding.weight" in legacy
    save_checkpoint(tmp_path, legacy, tiny_config())
    model = TwoTowerModel.from_pretrained(tmp_path)
    torch.testing.assert_close(
        model.context_tower.embeddings.weight, state["context_tower.embeddings.weight"]
    )
    assert canonical_name("denoiser_tower.embedding.weight") == "denoiser_tower.embeddings.weight"


def test_missing_and_unexpected_tensors_are_named(tmp_path: Path, tiny_checkpoint: Path) -> None:
    state = load_state_dict(tiny_checkpoint)
    del state["lm_head.weight"]
    state["denoiser_tower.extra.weight"] = torch.zeros(1)
    save_checkpoint(tmp_path, state, tiny_config())
    with pytest.raises(CheckpointError) as err:
        TwoTowerModel.from_pretrained(tmp_path)
    assert "lm_head.weight" in str(err.value)
    assert "denoiser_tower.extra.weight" in str(err.value)
    assert "missing" in str(err.value) and "unexpected" in str(err.value)


def test_missing_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_state_dict(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"gone\.safetensors"):
        load_state_dict(tmp_path)


def test_duplicate_names_across_spellings_are_rejected(tmp_path: Path) -> None:
    save_file(
        {"backbone.norm_f.weight": torch.ones(2), "context_tower.norm_f.weight": torch.ones(2)},
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(CheckpointError, match="stored twice"):
        load_state_dict(tmp_path)


def test_config_round_trip(tiny_checkpoint: Path) -> None:
    config = TwoTowerConfig.from_pretrained(tiny_checkpoint)
    assert config == tiny_config()

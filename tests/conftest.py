"""Shared fixtures: tiny random TwoTower checkpoints written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_twotower.reference import TwoTowerModel
from vllm_twotower.tools.make_tiny import make_tiny_checkpoint

# The test models are tiny: one intra-op thread is several times faster than two, and far
# faster when another process (a vLLM engine under test) is using the other core.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random TwoTower checkpoint (float32, single safetensors file)."""
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path) -> TwoTowerModel:
    torch.manual_seed(0)
    return TwoTowerModel.from_pretrained(tiny_checkpoint)

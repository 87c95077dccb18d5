"""The real 30B checkpoint, on the meta device: config, layout, strict load at TP 1 and TP 2.

Nobody here can download the 118 GB checkpoint, so its first load happens on a user's machine.
This test does what that load does, without data: ``tests/fixtures/nemotron-twotower-30b`` holds
the published config values (``config.json`` as NVIDIA ships it, ``auto_map`` and
``time_step_limit: [0.0, Infinity]`` included); vLLM builds its config and the project's model
from it exactly as ``vllm serve`` would, on the meta device; and a meta tensor for every tensor
of the real checkpoint (names and shapes from :func:`vllm_twotower.layout.checkpoint_layout`)
goes through the model's real ``load_weights`` on every TP rank.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import pytest
import torch

from vllm_twotower.checkpoint import CheckpointError
from vllm_twotower.config import TwoTowerConfig
from vllm_twotower.layout import checkpoint_layout, meta_checkpoint
from vllm_twotower.reference import TwoTowerModel
from vllm_twotower.tools.check_checkpoint import (
    check_checkpoint,
    engine_config,
    free_port,
    layout_tensors,
    load_rank,
)

REAL = Path(__file__).parent.parent / "fixtures" / "nemotron-twotower-30b"
#: NVIDIA's parameter count of the TwoTower checkpoint (both towers, heads, time conditioning,
#: the router correction biases), 117.7 GiB in bf16.
REAL_ELEMENTS = 63_185_902_848
REAL_TENSORS = 12_544
#: Tensors every TP rank holds whole: norms, routers, time conditioning.
_REPLICATED = re.compile(
    r"(\.layers\.\d+\.norm\.weight|\.norm_f\.weight|\.mixer\.gate\.|^t_embedder\.|^t_block\.|"
    r"^scale_shift_tables\.)"
)


@pytest.fixture(scope="module")
def real_config() -> TwoTowerConfig:
    return TwoTowerConfig.from_pretrained(REAL)


def test_layout_is_the_real_checkpoint(real_config: TwoTowerConfig) -> None:
    """The generated layout has the real checkpoint's 12,544 tensors and NVIDIA's count, and
    agrees name for name and shape for shape with the reference model built independently."""
    layout = checkpoint_layout(real_config)
    assert len(layout) == REAL_TENSORS
    assert sum(torch.Size(shape).numel() for shape in layout.values()) == REAL_ELEMENTS
    with torch.device("meta"):
        reference = TwoTowerModel(real_config)
    assert layout == {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    assert real_config.pattern.count("E") == 23 and real_config.chunk_size == 128
    assert layout["context_tower.layers.1.mixer.experts.127.down_proj.weight"] == (2688, 1856)
    assert layout["scale_shift_tables.51"] == (3, 2688)


def test_vllm_reads_the_real_config() -> None:
    """``config.json`` as published (remote-code ``auto_map``, ``Infinity``) needs no flags:
    the plugin's architecture and hook apply and the block bound is the trained 16, not 128."""
    from vllm_twotower.engine import params

    config = engine_config(REAL, 1)
    hf_config = config.model_config.hf_config
    assert config.model_config.architectures == ["NemotronHTwoTowerForCausalLM"]
    assert not config.model_config.trust_remote_code
    assert tuple(hf_config.time_step_limit) == (0.0, float("inf"))
    assert config.model_config.dtype == torch.bfloat16
    assert config.parallel_config.worker_cls.startswith("vllm_twotower.engine.worker.")
    assert config.cache_config.mamba_ssm_cache_dtype == "float32"
    assert params._admission_defaults is not None
    assert params._admission_defaults.max_block_size == 16
    with pytest.raises(ValueError, match="trained with blocks of 16"):
        params._admission_defaults.resolve({"block_size": 64})


def test_real_checkpoint_loads_strictly_at_tp1(real_config: TwoTowerConfig) -> None:
    """Every real tensor lands once with its shape; one missing expert is refused by name."""
    config = engine_config(REAL, 1)
    report = load_rank(config, meta_checkpoint(real_config), 0, f"tcp://127.0.0.1:{free_port()}")
    assert report.tensors == REAL_TENSORS
    assert report.parameters == REAL_ELEMENTS

    gone = "denoiser_tower.layers.51.mixer.experts.127.up_proj.weight"
    partial_download = ((n, t) for n, t in meta_checkpoint(real_config) if n != gone)
    with pytest.raises(CheckpointError, match=re.escape(gone)):
        # A fresh config: vLLM's layers register themselves in the config they are built with.
        load_rank(engine_config(REAL, 1), partial_download, 0, f"tcp://127.0.0.1:{free_port()}")


def test_real_checkpoint_loads_strictly_at_tp2(real_config: TwoTowerConfig) -> None:
    """Two ranks (two processes, gloo on loopback): each loads every tensor strictly and holds
    half of each sharded tensor plus a whole copy of the replicated ones."""
    reports = check_checkpoint(REAL, 2, partial(layout_tensors, str(REAL)))
    layout = checkpoint_layout(real_config)
    replicated = sum(
        torch.Size(shape).numel() for name, shape in layout.items() if _REPLICATED.search(name)
    )
    assert [r.rank for r in reports] == [0, 1]
    for report in reports:
        assert report.tensors == REAL_TENSORS
        assert report.parameters == (REAL_ELEMENTS - replicated) // 2 + replicated

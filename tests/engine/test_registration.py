"""Registration: the TwoTower architecture gets its engine defaults, other models do not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import vllm_twotower
from vllm_twotower import ARCHITECTURE


def engine_config(model: Path):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(model), max_model_len=512, enforce_eager=True)
    return args.create_engine_config()


def test_register_is_idempotent_and_lazy() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, NemotronHForCausalLMConfig

    vllm_twotower.register()
    vllm_twotower.register()
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()
    assert MODELS_CONFIG_MAP[ARCHITECTURE].__name__ == "TwoTowerConfigHook"
    assert MODELS_CONFIG_MAP["NemotronHForCausalLM"] is NemotronHForCausalLMConfig


def test_defaults_apply_to_twotower_only(tiny_checkpoint: Path, tmp_path: Path) -> None:
    vllm_twotower.register()
    config = engine_config(tiny_checkpoint)
    assert config.parallel_config.worker_cls.startswith("vllm_twotower.engine.worker.")
    assert config.scheduler_config.async_scheduling is False
    assert config.cache_config.mamba_ssm_cache_dtype == "float32"
    assert any("TwoTowerParamsValidator" in str(p) for p in config.model_config.logits_processors)

    # The same backbone declared as a plain NemotronH model keeps vLLM's defaults.
    plain = tmp_path / "plain"
    shutil.copytree(tiny_checkpoint, plain)
    raw = json.loads((plain / "config.json").read_text())
    raw["architectures"] = ["NemotronHForCausalLM"]
    (plain / "config.json").write_text(json.dumps(raw))
    config = engine_config(plain)
    assert not config.parallel_config.worker_cls.startswith("vllm_twotower")
    assert not config.model_config.logits_processors

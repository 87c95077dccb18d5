"""Runner selection: a TwoTower engine runs on vLLM's V1 model runner on every platform.

On CUDA, vLLM 0.32 picks Model Runner V2 whenever Triton is importable.  The TwoTower block
step overrides the V1 runner, so the config hook pins vLLM's own switch
(``VLLM_USE_V2_MODEL_RUNNER=0``) for every process, the CUDA worker builds the TwoTower runner
in vLLM's factory hook, and a forced V2 fails with a message naming the cause.  This machine
has no GPU and no Triton CPU backend, so the CUDA side is faked the way vLLM itself decides
it: ``HAS_TRITON`` true and a platform that is not the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

import vllm_twotower
from vllm_twotower import vllm_internals as vi

SWITCH = vi.V2_RUNNER_SWITCH


def engine_config(model: Path) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    vllm_twotower.register()
    return EngineArgs(
        model=str(model), max_model_len=512, enforce_eager=True
    ).create_engine_config()


def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's view of a CUDA machine with Triton: what makes it choose Model Runner V2."""
    import vllm.config.vllm as vllm_config_module
    from vllm.platforms import current_platform

    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.delenv(SWITCH, raising=False)


def plain_nemotron_h(checkpoint: Path, tmp_path: Path) -> Path:
    """The same backbone declared as vLLM's own NemotronH (no TwoTower hook)."""
    plain = tmp_path / "plain"
    shutil.copytree(checkpoint, plain)
    raw = json.loads((plain / "config.json").read_text())
    raw["architectures"] = ["NemotronHForCausalLM"]
    (plain / "config.json").write_text(json.dumps(raw))
    return plain


def test_cuda_config_pins_v1_and_the_twotower_gpu_worker(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_twotower.engine.config_hook import TwoTowerConfigHook

    # Built on this CPU machine, then judged as vLLM would judge it on a CUDA one.
    plain = engine_config(plain_nemotron_h(tiny_checkpoint, tmp_path))
    config = engine_config(tiny_checkpoint)
    config.parallel_config.worker_cls = "auto"
    fake_cuda(monkeypatch)
    # The fake is what vLLM needs to choose V2: a model without the hook gets it...
    assert plain.use_v2_model_runner is True
    assert config.use_v2_model_runner is True  # ...and so would TwoTower, without its hook.

    TwoTowerConfigHook.verify_and_update_config(config)
    assert config.parallel_config.worker_cls == "vllm_twotower.engine.worker.TwoTowerGPUWorker"
    assert os.environ[SWITCH] == "0"  # inherited by the engine core and workers
    assert config.use_v2_model_runner is False
    from vllm_twotower.engine import worker

    assert worker.TwoTowerGPUWorker.__name__ == "TwoTowerGPUWorker"  # the name resolves


def test_forcing_v2_is_refused_naming_the_switch(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SWITCH, "1")
    with pytest.raises(ValueError, match=f"{SWITCH}=1 asks for Model Runner V2.*V1 model runner"):
        engine_config(tiny_checkpoint)


def test_cuda_worker_builds_the_twotower_runner_in_its_factory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm_twotower.engine.gpu_worker import TwoTowerGPUModelRunner, TwoTowerGPUWorker
    from vllm_twotower.engine.worker import V2_REFUSED

    built: list[tuple[object, object]] = []

    def record(runner: TwoTowerGPUModelRunner, vllm_config: object, device: object) -> None:
        built.append((vllm_config, device))  # constructing a real one needs a GPU

    monkeypatch.setattr(TwoTowerGPUModelRunner, "__init__", record)
    worker = object.__new__(TwoTowerGPUWorker)  # vLLM's __init__ needs a GPU too
    worker.vllm_config, worker.device = "config", "cuda:0"

    worker.use_v2_model_runner = False
    runner = worker._make_model_runner()
    assert isinstance(runner, TwoTowerGPUModelRunner)
    assert built == [("config", "cuda:0")]

    worker.use_v2_model_runner = True
    with pytest.raises(RuntimeError) as error:
        worker._make_model_runner()
    assert str(error.value) == V2_REFUSED
    assert SWITCH in V2_REFUSED
    assert len(built) == 1


def test_cpu_worker_refuses_a_v2_decision_before_building_anything() -> None:
    from vllm_twotower.engine.worker import V2_REFUSED, TwoTowerCPUWorker

    worker = object.__new__(TwoTowerCPUWorker)
    worker.use_v2_model_runner = True
    with pytest.raises(RuntimeError, match="V1 model runner"):
        worker.init_device()
    assert not hasattr(worker, "model_runner")
    assert "Model Runner V2" in V2_REFUSED
